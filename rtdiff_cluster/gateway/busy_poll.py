"""While replicas compute, the gateway's event loop polls its sockets instead of sleeping.

A batch's answer reaches the gateway 10-20 ms after it was sent (a GPU frame). An event loop that
spent that time asleep in epoll wakes slowly: on the 2-core VM a stub replica that answers after
13 ms raised the gateway's p50 overhead from +0.94-0.98 ms (answering at once) to +1.39-1.49 ms
for unary calls; with the loop polling it was +0.81-0.89 ms (benchmarks/NOTES.md, "The gateway
asleep while a replica computes"). Polling costs one core while any batch is in flight and nothing
otherwise, so it is for GPU serving: `auto` turns it on when every replica computes on a GPU and
the host has cores to spare. Only the gateway polls. A replica's loop shares the GIL with its
compute thread, which a polling loop would keep waiting.
"""

from __future__ import annotations

import asyncio
import os

# With fewer cores a polling loop takes a core the gRPC threads and the replicas need.
MIN_CORES = 4
# How often a long polling spell adds its time to the counter (a spell lasts as long as the load).
COUNT_EVERY_S = 0.25


def busy_poll_choice(setting: str, devices: list[str], cores: int | None = None) -> tuple[bool, str]:
    """(on, why) for ServerConfig.busy_poll given the devices the replicas report."""
    if cores is None:
        cores = os.cpu_count() or 1
    if setting != "auto":
        return setting == "always", f"busy_poll = {setting}"
    off_gpu = sorted({d for d in devices if not d.startswith("cuda")})
    if off_gpu:
        return False, f"auto: replicas compute on {', '.join(off_gpu)}, which polling would take a core from"
    if cores < MIN_CORES:
        return False, f"auto: {cores} cores here, fewer than {MIN_CORES}"
    return True, f"auto: every replica computes on a GPU and {cores} cores are here"


class BusyPoll:
    """Counts the batches in flight; while there are any and polling is on, a task keeps the loop
    turning (`sleep(0)`: the selector is asked with a zero timeout) so an answer is read at once."""

    def __init__(self, seconds_counter=None):
        self.enabled = False
        self._holds = 0
        self._task: asyncio.Task | None = None
        self._seconds = seconds_counter  # a prometheus Counter, or None

    @property
    def polling(self) -> bool:
        return self._task is not None

    def hold(self) -> None:
        self._holds += 1
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._poll())

    def release(self) -> None:
        self._holds = max(0, self._holds - 1)

    def stop(self) -> None:
        self.enabled = False
        if self._task is not None:
            self._task.cancel()

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        mark = loop.time()
        try:
            while self._holds > 0 and self.enabled:
                await asyncio.sleep(0)
                now = loop.time()
                if now - mark >= COUNT_EVERY_S:
                    self._count(now - mark)
                    mark = now
        finally:
            self._count(loop.time() - mark)
            self._task = None

    def _count(self, seconds: float) -> None:
        if self._seconds is not None and seconds > 0:
            self._seconds.inc(seconds)
