"""Runs a function on N gloo ranks (spawned processes) and returns rank 0's result: the
tensor-parallel tests compare it against the same function on one process."""

from __future__ import annotations

import socket
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, tp: int, cfg: int, port: int, fn, args, queue) -> None:
    from rtdiff_cluster.parallel import groups

    try:
        torch.set_num_threads(1)
        groups.init(groups.Layout(tp=tp, cfg=cfg), rank, "127.0.0.1", port, torch.device("cpu"), timeout_s=120)
        out = fn(*args)
        if rank == 0:
            queue.put(("ok", out))
    except BaseException:
        queue.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))
    finally:
        groups.destroy()


def run_ranks(fn, *args, tp: int = 2, cfg: int = 1, timeout_s: float = 240):
    """fn(*args) on tp*cfg ranks; rank 0's return value (must pickle). fn must be importable."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, tp, cfg, port, fn, args, queue)) for r in range(tp * cfg)]
    for p in procs:
        p.start()
    try:
        status, value = queue.get(timeout=timeout_s)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    if status != "ok":
        raise AssertionError(value)
    return value


def run_single(fn, *args):
    """fn(*args) in this process with a group of one."""
    from rtdiff_cluster.parallel import groups

    groups.init_single(torch.device("cpu"))
    try:
        return fn(*args)
    finally:
        groups.destroy()
