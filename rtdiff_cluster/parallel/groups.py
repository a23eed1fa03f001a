"""The one owner of a replica's process groups; everything else asks through the accessors here.

A replica is `tp x cfg` processes (one Ray actor per GPU). Rank r holds tensor-parallel shard
`r % tp` of CFG branch `r // tp` (branch 0 computes the unconditional half, branch 1 the
conditional one when cfg = 2):

    tp=2, cfg=2:   tp groups [0, 1] [2, 3]      cfg groups [0, 2] [1, 3]

Tensors travel over NCCL on GPU and gloo on CPU; objects (batches from the leader, rank 0) over a
gloo group of all ranks, since NCCL moves only CUDA tensors. A replica of one process calls
`init_single()`: the accessors then describe a group of one and collectives are skipped.
Accessors raise when neither init was called, so no code silently runs unsharded.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    cfg: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.cfg

    def tp_index(self, rank: int) -> int:
        return rank % self.tp

    def cfg_index(self, rank: int) -> int:
        return rank // self.tp

    def tp_ranks(self, cfg_index: int) -> list[int]:
        return [cfg_index * self.tp + i for i in range(self.tp)]

    def cfg_ranks(self, tp_index: int) -> list[int]:
        return [c * self.tp + tp_index for c in range(self.cfg)]


@dataclass
class _State:
    layout: Layout
    rank: int
    device: torch.device
    tp_group: dist.ProcessGroup | None
    cfg_group: dist.ProcessGroup | None
    control_group: dist.ProcessGroup | None
    distributed: bool


_state: _State | None = None


def init_single(device: torch.device) -> None:
    """A replica of one process: no process group, every collective is the identity."""
    global _state
    _state = _State(Layout(), 0, device, None, None, None, False)


# The control group waits for the leader's next batch, which an idle replica may not send for
# hours: its operations must not time out. Rank failures are found by the supervisor instead.
CONTROL_TIMEOUT = datetime.timedelta(days=365)


def init(layout: Layout, rank: int, master_addr: str, master_port: int, device: torch.device,
         timeout_s: float = 120.0) -> None:
    """Joins the replica's world and builds its tp, cfg and control groups. Collective: every rank
    of the replica calls it with the same layout, address and port. timeout_s bounds the
    rendezvous and each tensor collective (a peer that never answers)."""
    global _state
    if layout.world == 1:
        init_single(device)
        return
    if not 0 <= rank < layout.world:
        raise ValueError(f"rank: {rank} is outside 0..{layout.world - 1}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                            world_size=layout.world, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    # new_group is collective over the whole world: every rank creates every group, in the same order.
    tp_groups = [dist.new_group(layout.tp_ranks(c)) for c in range(layout.cfg)]
    cfg_groups = [dist.new_group(layout.cfg_ranks(t)) for t in range(layout.tp)]
    control = dist.new_group(list(range(layout.world)), backend="gloo", timeout=CONTROL_TIMEOUT)
    _state = _State(layout, rank, device, tp_groups[layout.cfg_index(rank)], cfg_groups[layout.tp_index(rank)],
                    control, True)


def destroy() -> None:
    global _state
    if _state is not None and _state.distributed and dist.is_initialized():
        dist.destroy_process_group()
    _state = None


def _get() -> _State:
    if _state is None:
        raise RuntimeError("process groups are not set up: call parallel.groups.init() or init_single() first")
    return _state


def is_initialized() -> bool:
    return _state is not None


def layout() -> Layout:
    return _get().layout


def rank() -> int:
    return _get().rank


def is_leader() -> bool:
    return _get().rank == 0


def device() -> torch.device:
    return _get().device


def tp_size() -> int:
    return _get().layout.tp


def tp_rank() -> int:
    s = _get()
    return s.layout.tp_index(s.rank)


def cfg_size() -> int:
    return _get().layout.cfg


def cfg_rank() -> int:
    s = _get()
    return s.layout.cfg_index(s.rank)


def tp_group() -> dist.ProcessGroup | None:
    return _get().tp_group


def cfg_group() -> dist.ProcessGroup | None:
    return _get().cfg_group


def all_reduce_tp(x: torch.Tensor) -> torch.Tensor:
    """Sums x over the tensor-parallel group, in place; the identity at tp=1."""
    s = _get()
    if s.layout.tp > 1:
        dist.all_reduce(x, group=s.tp_group)
    return x


def all_gather_cfg(x: torch.Tensor) -> list[torch.Tensor]:
    """x from every CFG branch, in branch order; [x] at cfg=1."""
    s = _get()
    if s.layout.cfg == 1:
        return [x]
    out = [torch.empty_like(x) for _ in range(s.layout.cfg)]
    dist.all_gather(out, x.contiguous(), group=s.cfg_group)
    return out


def broadcast_object(obj=None):
    """The leader's obj on every rank (pickled once, over the gloo control group)."""
    s = _get()
    if not s.distributed:
        return obj
    box = [obj if s.rank == 0 else None]
    dist.broadcast_object_list(box, src=0, group=s.control_group)
    return box[0]


def gather_object(obj) -> list:
    """Every rank's obj on the leader, in rank order (other ranks get []); [obj] on a group of one."""
    s = _get()
    if not s.distributed:
        return [obj]
    out = [None] * s.layout.world if s.rank == 0 else None
    dist.gather_object(obj, out, dst=0, group=s.control_group)
    return out or []
