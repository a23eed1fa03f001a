"""The replicas of one model as the gateway sees them: up or down, and how much work each holds.

Routing picks the replica with the least outstanding work (frames x steps x pixels in flight).
Batches travel over each replica leader's link (engine/link.py); control calls over Ray. A replica
is marked down when its link drops, a Ray call finds its actor gone, or any of its ranks dies (a
pending `lifeline` call per rank fails). Then every rank restarts (Ray's max_restarts; the ones
still alive are killed first, since a torch.distributed group cannot take a new member), and a
recovery task starts the group again, warms it up and reconnects before routing to it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from rtdiff_cluster.engine.group import ReplicaGroup, gather_refs
from rtdiff_cluster.engine.link import LinkLost, ReplicaLink
from rtdiff_cluster.engine.replica import ReplicaInfo
from rtdiff_cluster.metrics.gateway_metrics import GatewayMetrics

log = logging.getLogger("rtdiff.router")

# How long one attempt to reach a restarting replica may take before we try again.
RECOVERY_PROBE_TIMEOUT_S = 30.0


def is_actor_gone(exc: BaseException) -> bool:
    """True when a link or Ray call failed because a rank of the replica is gone or restarting
    (a leader whose collective failed says so with ReplicaBroken)."""
    import ray.exceptions as rex

    from rtdiff_cluster.engine.link import ReplicaCallError

    if isinstance(exc, ReplicaCallError) and str(exc).startswith("ReplicaBroken:"):
        return True
    gone = [rex.RayActorError, LinkLost]
    for name in ("ActorDiedError", "ActorUnavailableError", "ActorUnschedulableError"):
        if hasattr(rex, name):
            gone.append(getattr(rex, name))
    return isinstance(exc, tuple(gone))


class ReplicaHandle:
    def __init__(self, model: str, index: int, group: ReplicaGroup):
        self.model = model
        self.index = index
        self.name = f"{model}/{index}"
        self.group = group
        self.link: ReplicaLink | None = None  # set while up
        self.up = False
        self.generation = 0  # bumps each time the replica goes down: pinned streams notice
        self.inflight_batches = 0
        self.outstanding_work = 0.0
        self.info: ReplicaInfo | None = None
        self._watch: asyncio.Task | None = None
        self._energy_mark: tuple | None = None  # (frames computed, batch energy) at the last poll

    @property
    def leader(self):
        return self.group.leader

    def begin(self, work: float) -> None:
        self.inflight_batches += 1
        self.outstanding_work += work

    def end(self, work: float) -> None:
        self.inflight_batches -= 1
        self.outstanding_work = max(0.0, self.outstanding_work - work)


class ReplicaSet:
    def __init__(self, model: str, groups: list[ReplicaGroup], metrics: GatewayMetrics, warmup: bool,
                 on_change: Callable[[], None], on_down: Callable[[ReplicaHandle], None]):
        self.model = model
        self.on_down = on_down
        self.handles = [ReplicaHandle(model, i, g) for i, g in enumerate(groups)]
        self.metrics = metrics
        self.on_change = on_change
        self.warmup = warmup
        self._recovering: dict[int, asyncio.Task] = {}
        self.stopped = False
        self._gpu_reason_logged = False
        self.series = metrics.model(model)
        for h in self.handles:
            self.series.replica(h.name).up.set(0)

    def up(self) -> list[ReplicaHandle]:
        return [h for h in self.handles if h.up]

    def least_loaded(self, candidates: list[ReplicaHandle]) -> ReplicaHandle:
        return min(candidates, key=lambda h: (h.outstanding_work, h.inflight_batches, h.index))

    async def _bring_up(self, h: ReplicaHandle, timeout: float | None) -> None:
        t0 = time.perf_counter()
        h.info = await h.group.start(timeout)
        i = h.info
        shape = f", tp={i.tp}" + (f" x cfg-parallel {i.cfg_parallel}" if i.cfg_parallel > 1 else "") if i.tp * i.cfg_parallel > 1 else ""
        log.info("replica %s loaded %s on %s (%s%s, %.1f MB of weights on the leader, host threads: %d) in %.2f s",
                 h.name, i.limits.name, i.device, i.dtype, shape, i.parameter_bytes / 1e6, i.torch_threads, i.load_s)
        if i.gpu_disabled_reason and not self._gpu_reason_logged:
            self._gpu_reason_logged = True
            log.info("GPU metrics are off for model %s: %s", self.model, i.gpu_disabled_reason)
        for path, what in i.fast_paths.items():
            log.info("replica %s fast path %s: %s", h.name, path, what)
        if self.warmup:
            warm_s, attention, fp8_fidelity = await asyncio.wait_for(h.leader.warmup.remote(), timeout)
            log.info("replica %s warmed up in %.2f s; attention backends: %s", h.name, warm_s, attention)
            if fp8_fidelity:
                log.info("replica %s FP8 fidelity %s", h.name, fp8_fidelity)
        link = await ReplicaLink.connect(i.link, on_lost=lambda why: self._link_lost(h, link, why))
        if h.link is not None:
            h.link.close()
        h.link = link
        h.up = True
        if h._watch is not None:
            h._watch.cancel()
        h._watch = asyncio.create_task(self._watch_ranks(h, h.generation))
        self.series.replica(h.name).up.set(1)
        log.info("replica %s ready after %.2f s", h.name, time.perf_counter() - t0)
        self.on_change()

    async def start(self) -> list[ReplicaInfo]:
        """Waits until every replica has loaded and warmed up; raises if one fails to load."""
        await asyncio.gather(*(self._bring_up(h, None) for h in self.handles))
        return [h.info for h in self.handles]

    async def _watch_ranks(self, h: ReplicaHandle, generation: int) -> None:
        waits = [asyncio.ensure_future(line) for line in h.group.lifelines()]
        if not waits:
            return
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if h.generation == generation:
            rank = next(i for i, w in enumerate(waits) if w in done)
            self.mark_down(h, f"rank {rank} of {h.group.config.ranks} died")

    def _link_lost(self, h: ReplicaHandle, link: ReplicaLink, why: str) -> None:
        if h.link is link:
            self.mark_down(h, f"link {why}")

    def mark_down(self, h: ReplicaHandle, why: str) -> None:
        if self.stopped or (not h.up and h.index in self._recovering):
            return
        if h.up:
            log.warning("replica %s is down: %s", h.name, why)
        h.up = False
        if h.link is not None:
            h.link, link = None, h.link
            link.close()  # fails its in-flight calls with LinkLost
        h.generation += 1
        h._energy_mark = None  # a restarted replica counts frames and energy from zero
        self.series.replica(h.name).up.set(0)
        self.metrics.drop_replica_stats(self.model, h.name)
        self.on_down(h)
        self.on_change()
        if h.index not in self._recovering:
            self._recovering[h.index] = asyncio.create_task(self._recover(h))

    async def _recover(self, h: ReplicaHandle) -> None:
        t0 = time.perf_counter()
        await h.group.restart()  # a group restarts whole: its surviving ranks are killed and restarted too
        try:
            while True:
                try:
                    await self._bring_up(h, RECOVERY_PROBE_TIMEOUT_S)
                    log.info("replica %s is back after %.1f s", h.name, time.perf_counter() - t0)
                    return
                except asyncio.TimeoutError:
                    continue
                except Exception as e:
                    if is_actor_gone(e) and _out_of_restarts(e):
                        log.error("replica %s will not come back: %s", h.name, e)
                        return
                    await asyncio.sleep(0.5)
        finally:
            self._recovering.pop(h.index, None)

    async def poll_stats(self) -> None:
        for h in self.up():
            try:
                every = await asyncio.wait_for(gather_refs([a.stats.remote() for a in h.group.actors]),
                                               RECOVERY_PROBE_TIMEOUT_S)
            except asyncio.TimeoutError:
                continue
            except Exception as e:
                if is_actor_gone(e):
                    self.mark_down(h, f"{type(e).__name__}")
                continue
            stats = every[0]
            stats.gpus = [g for s in every for g in s.gpus]  # the leader's counters, every rank's GPUs
            stats.batch_energy_joules = sum(s.batch_energy_joules for s in every)
            self._observe_energy(h, stats)
            self.metrics.set_replica_stats(self.model, h.name, stats)

    def _observe_energy(self, h: ReplicaHandle, stats) -> None:
        """Joules per frame over the last poll interval: the replica's GPU energy during batches,
        all ranks together, over the frames it computed; each of those frames observes the mean."""
        last, h._energy_mark = h._energy_mark, (stats.frames_computed, stats.batch_energy_joules, stats.gpus != [])
        if last is None or not stats.gpus:
            return
        frames, joules = stats.frames_computed - last[0], stats.batch_energy_joules - last[1]
        if frames > 0 and joules >= 0:  # a restarted replica counts from zero again: skip that interval
            per_frame = joules / frames
            for _ in range(frames):
                self.series.frame_energy.observe(per_frame)

    async def stop(self, kill: bool) -> None:
        """Closes the links (the replicas drop this gateway's streams) and, with kill, ends the actors."""
        self.stopped = True  # closing the links below fails in-flight batches; that is no replica failure
        for t in list(self._recovering.values()):
            t.cancel()
        for h in self.handles:
            h.up = False
            if h._watch is not None:
                h._watch.cancel()
            if h.link is not None:
                h.link.close()
                h.link = None
            if kill:
                h.group.kill()


def _out_of_restarts(exc: BaseException) -> bool:
    """Ray says so in the death cause when max_restarts is spent or the actor was killed for good."""
    text = str(exc).lower()
    return "max_restarts" in text or "no_restart" in text or "will not be restarted" in text or "ray.kill" in text
