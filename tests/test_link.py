"""The replica link (engine/link.py): authentication before anything is unpickled, replies matched
to requests in any order, errors carried back, a lost connection failing its calls at once, and a
gateway that goes away freeing its streams on the replica."""

from __future__ import annotations

import asyncio
import dataclasses
import pickle

import pytest

from conftest import wait_until
from rtdiff_cluster.engine.link import (HEADER, MAGIC, BlockingLink, LinkAddress, LinkLost, LinkServer, ReplicaCallError,
                                        ReplicaLink, new_key)
from rtdiff_cluster.proto.rtdiff.v1 import diffusion_pb2 as pb


class Handlers:
    def __init__(self):
        self.calls: list[tuple] = []
        self.release = asyncio.Event()

    async def echo(self, x):
        self.calls.append(("echo", x))
        return x

    async def slow(self, x):
        self.calls.append(("slow", x))
        await self.release.wait()
        return x * 10

    async def fail(self):
        raise ValueError("width must be positive")

    def table(self):
        return {"echo": self.echo, "slow": self.slow, "fail": self.fail}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_calls_are_answered_by_id_in_any_order_and_errors_come_back():
    async def main():
        h = Handlers()
        server = LinkServer(h.table(), new_key())
        address = await server.start("127.0.0.1")
        link = await ReplicaLink.connect(address)
        slow = link.call("slow", 4)
        fast = link.call("echo", {"frame": b"\x00" * 100_000})
        assert (await fast) == {"frame": b"\x00" * 100_000}, "a later call is not held up by an earlier slow one"
        assert not slow.done()
        h.release.set()
        assert await slow == 40
        with pytest.raises(ReplicaCallError, match="ValueError: width must be positive"):
            await link.call("fail")
        with pytest.raises(ReplicaCallError, match="no link method 'run_shell'"):
            await link.call("run_shell", "rm -rf /")
        assert h.calls[:2] == [("slow", 4), ("echo", {"frame": b"\x00" * 100_000})], "handlers start in send order"
        link.close()
        await server.stop()

    run(main())


CANARY_RUNS: list[str] = []


def _canary(note: str) -> None:
    CANARY_RUNS.append(note)


class Canary:
    """Unpickling this runs _canary: proof that a peer's bytes were unpickled."""

    def __reduce__(self):
        return (_canary, ("the server unpickled a stranger's message",))


def test_a_peer_without_the_key_is_dropped_before_anything_is_unpickled():
    async def main():
        h = Handlers()
        server = LinkServer(h.table(), new_key())
        address = await server.start("127.0.0.1")
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await ReplicaLink.connect(LinkAddress(address.host, address.port, new_key()))
        # A raw peer that guesses the proof, then sends a pickle.
        reader, writer = await asyncio.open_connection(address.host, address.port)
        await reader.readexactly(HEADER.size + len(MAGIC) + 32)
        poison = pickle.dumps(("echo", (Canary(),)))
        writer.write(HEADER.pack(0, 64) + bytes(64) + HEADER.pack(1, len(poison)) + poison)
        assert await reader.read() == b"", "the server hung up"
        writer.close()
        # A raw peer that announces a 1 GB frame before authenticating: dropped, nothing allocated.
        reader, writer = await asyncio.open_connection(address.host, address.port)
        await reader.readexactly(HEADER.size + len(MAGIC) + 32)
        writer.write(HEADER.pack(0, 1 << 30))
        assert await reader.read() == b"", "the server hung up"
        writer.close()
        # The real key still works afterwards.
        link = await ReplicaLink.connect(address)
        assert await link.call("echo", 7) == 7
        link.close()
        await server.stop()
        assert "LinkAddress(127.0.0.1:" in repr(address) and address.key.hex() not in repr(address)

    pickle.loads(pickle.dumps(Canary()))
    assert CANARY_RUNS == ["the server unpickled a stranger's message"], "the canary works"
    CANARY_RUNS.clear()
    run(main())
    assert CANARY_RUNS == []


def test_lost_connection_fails_pending_calls_at_once_and_reports_once():
    async def main():
        h = Handlers()
        server = LinkServer(h.table(), new_key())
        address = await server.start("127.0.0.1")
        lost: list[str] = []
        link = await ReplicaLink.connect(address, on_lost=lost.append)
        pending = link.call("slow", 1)
        await asyncio.sleep(0.05)
        await server.stop()  # as a replica process that exits would
        with pytest.raises(LinkLost):
            await pending
        assert len(lost) == 1 and "connection lost" in lost[0]
        with pytest.raises(LinkLost):
            await link.call("echo", 1)  # a closed link fails new calls too, without sending
        link.close()
        assert len(lost) == 1, "closing by the gateway itself is not reported as a loss"

    run(main())


def test_blocking_link_for_scripts():
    async def serve(ready: asyncio.Future, stop: asyncio.Event):
        server = LinkServer(Handlers().table(), new_key())
        ready.set_result(await server.start("127.0.0.1"))
        await stop.wait()
        await server.stop()

    import threading

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    stop = asyncio.Event()
    ready = loop.create_future()
    asyncio.run_coroutine_threadsafe(serve(ready, stop), loop)
    address = asyncio.run_coroutine_threadsafe(asyncio.wait_for(asyncio.shield(ready), 10), loop).result(10)
    with BlockingLink(address) as link:
        assert link.call("echo", [1, 2]) == [1, 2]
        with pytest.raises(ReplicaCallError, match="width must be positive"):
            link.call("fail")
        assert link.call("echo", "still usable") == "still usable"
    with pytest.raises(ConnectionError):
        BlockingLink(dataclasses.replace(address, key=new_key()))
    loop.call_soon_threadsafe(stop.set)


def test_a_closed_connection_frees_the_streams_it_opened_on_the_replica(ray_cluster, tiny_actors):
    """A gateway that dies without closing its streams leaves no state behind on the replica."""
    from rtdiff_cluster.engine.pipeline import BatchSpec, FrameSpec

    actor = tiny_actors[0].leader
    streams = lambda: ray_cluster.get(actor.stats.remote()).streams  # noqa: E731
    address = ray_cluster.get(actor.info.remote()).link
    baseline = streams()
    link = BlockingLink(address)
    for sid in ("left-open-1", "left-open-2"):
        spec = BatchSpec(64, 64, 1, 0.0, 0.0, [FrameSpec("a prompt held for the stream", stream_id=sid, output_format=pb.IMAGE_FORMAT_RAW_RGB8)])
        result = link.call("run_batch", spec)
        assert result.frames[0].width == 64 and not result.frames[0].error
    follow = BatchSpec(64, 64, 1, 0.0, 0.0, [FrameSpec(None, stream_id="left-open-1", output_format=pb.IMAGE_FORMAT_RAW_RGB8)])
    assert not link.call("run_batch", follow).frames[0].error, "a later frame uses the held prompt"
    assert streams() == baseline + 2
    link.close()  # as a crashed gateway's socket would
    wait_until(lambda: streams() == baseline, what="the replica dropped the closed connection's streams")
