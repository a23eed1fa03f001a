"""A Gateway on its own event loop in a background thread, for code that is not asyncio itself
(embedding in a synchronous program, benchmarks, tests). `rtdiff serve` runs the same Gateway on
the main thread's loop."""

from __future__ import annotations

import asyncio
import threading

from rtdiff_cluster.config import ServerConfig
from rtdiff_cluster.gateway.server import Gateway


class BackgroundGateway:
    def __init__(self, config: ServerConfig, replicas: dict[str, list] | None = None, start_timeout_s: float = 600):
        """Starts the gateway and returns once every replica is ready (or raises)."""
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="rtdiff-gateway", daemon=True)
        self.thread.start()
        self.gateway = Gateway(config, replicas)
        try:
            self.run(self.gateway.start(), timeout=start_timeout_s)
        except BaseException:
            self.stop()
            raise
        host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "[::]") else config.host
        self.target = f"{host}:{self.gateway.port}"

    def run(self, coro, timeout: float | None = 60):
        """Runs a coroutine on the gateway's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn):
        """Runs fn() on the gateway's loop (its state is not thread-safe) and returns the result."""
        async def wrap():
            return fn()
        return self.run(wrap())

    def stop(self, grace_s: float = 0.5) -> None:
        if self.loop.is_closed():
            return
        try:
            self.run(self.gateway.stop(grace_s=grace_s), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()
