"""The data plane between the gateway and a replica: batches in, frames out, over one TCP
connection per gateway, beside Ray rather than through it.

Why not a Ray actor call: awaiting a Ray call inside the grpc.aio handler cost 1.8 ms more than the
handler alone on the 2-core VM, this link 0.2-0.3 ms (benchmarks/NOTES.md, "The replica link"). The
Ray call crosses three threads (gRPC poller, event loop, Ray's I/O thread); the link's socket is
read by the event loop itself, in a protocol callback, with no task in between. Ray still creates,
places and restarts replicas and carries the control calls (info, warm-up, stats); the link
carries only the hot path.

Wire format: frames of a 16-byte header (request id, payload length) and a payload. The first
three frames are a mutual handshake, raw bytes: the replica sends MAGIC and a nonce, the peer
answers HMAC-SHA256(key, "c" + that nonce) and a nonce of its own, the replica answers
HMAC-SHA256(key, "s" + the peer's nonce). The key is random per replica and travels only through
Ray (whoever can call the actor could already run code in it). Only then are payloads pickles
(protocol 5): unpickling runs code, so neither side unpickles anything from a peer that has not
proved it holds the key, and a handshake frame larger than the handshake is refused. A request is
`(method, args)`; a reply `(True, value)` or `(False, "Type: message")`; replies may come in any
order and the request id matches them.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import logging
import pickle
import secrets
import socket
import struct
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

log = logging.getLogger("rtdiff.link")

MAGIC = b"RTDL2"  # protocol name and version, first bytes the replica sends
NONCE_BYTES = 32
PROOF_BYTES = 32  # an HMAC-SHA256 digest
HEADER = struct.Struct("!QQ")  # request id, payload bytes
HANDSHAKE_MAX_BYTES = 128
MAX_PAYLOAD_BYTES = 1 << 31  # a batch of frames is tens of MB at most; beyond this the stream is corrupt
HANDSHAKE_TIMEOUT_S = 10.0
SCRATCH_BYTES = 256 * 1024  # messages up to this size are parsed in place; larger ones get their own buffer

# Which connection the current request came from (None for calls that did not come over a link):
# a replica ties per-stream state to it and drops that state when the connection closes.
current_peer: contextvars.ContextVar[int | None] = contextvars.ContextVar("rtdiff_link_peer", default=None)


class LinkLost(ConnectionError):
    """The connection to the replica closed: the replica died, restarted or dropped us."""


class ReplicaCallError(Exception):
    """The replica ran the call and it raised; the message is the replica's `Type: message`."""


@dataclass(frozen=True)
class LinkAddress:
    host: str
    port: int
    key: bytes  # shared secret; travels only through Ray

    def __repr__(self) -> str:  # never print the key
        return f"LinkAddress({self.host}:{self.port})"


def new_key() -> bytes:
    return secrets.token_bytes(32)


def _proof(key: bytes, side: bytes, nonce: bytes) -> bytes:
    return hmac.new(key, side + nonce, hashlib.sha256).digest()


def _frames(request_id: int, payload: bytes) -> list[bytes]:
    """What to write for one message: joined when small (one segment), apart when large (no copy)."""
    header = HEADER.pack(request_id, len(payload))
    return [header + payload] if len(payload) < SCRATCH_BYTES else [header, payload]


class _Framer(asyncio.BufferedProtocol):
    """Cuts the byte stream into frames and hands each payload to `on_frame(request_id, payload)`.

    Small frames are parsed where the socket wrote them (a scratch buffer); a frame larger than
    the scratch gets a buffer of its exact size that the socket fills directly, so a 3 MB image is
    copied once on its way in. `max_frame` bounds what a peer may announce."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.max_frame = HANDSHAKE_MAX_BYTES
        self._scratch = bytearray(SCRATCH_BYTES)
        self._have = 0
        self._big: bytearray | None = None
        self._big_have = 0
        self._big_id = 0

    # subclasses implement these
    def on_frame(self, request_id: int, payload) -> None:
        raise NotImplementedError

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_buffer(self, sizehint: int):
        if self._big is not None:
            return memoryview(self._big)[self._big_have:]
        return memoryview(self._scratch)[self._have:]

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self._big is not None:
                self._big_have += nbytes
                if self._big_have == len(self._big):
                    big, self._big = self._big, None
                    self.on_frame(self._big_id, big)
                return
            self._have += nbytes
            self._parse_scratch()
        except Exception as e:  # a malformed frame: this connection cannot be trusted any more
            self.fail(e)

    def _parse_scratch(self) -> None:
        view = memoryview(self._scratch)
        pos = 0
        try:
            while self._have - pos >= HEADER.size and not self.transport.is_closing():
                request_id, size = HEADER.unpack_from(self._scratch, pos)
                if size > self.max_frame:
                    raise ConnectionError(f"peer announced a {size}-byte frame; the limit here is {self.max_frame}")
                start = pos + HEADER.size
                if self._have - start >= size:
                    pos = start + size
                    self.on_frame(request_id, view[start:pos])
                    continue
                if size + HEADER.size > len(self._scratch):  # will not fit: give it a buffer of its own
                    got = self._have - start
                    self._big = bytearray(size)
                    self._big[:got] = view[start:self._have]
                    self._big_have, self._big_id = got, request_id
                    pos = self._have
                break
        finally:
            view.release()
        rest = self._have - pos
        if rest and pos:
            self._scratch[:rest] = self._scratch[pos:self._have]
        self._have = rest

    def send(self, request_id: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            for part in _frames(request_id, payload):
                self.transport.write(part)

    def fail(self, exc: BaseException) -> None:
        if self.transport is not None:
            self.transport.abort()


# ---- the replica's side -----------------------------------------------------------------------

class LinkServer:
    """Serves `handlers` (name -> coroutine function) to authenticated peers.

    Each request starts as a task as soon as its frame is read, in arrival order: a handler that
    does its bookkeeping before its first await (EngineReplica.run_batch queues compute there)
    therefore sees requests in the order the gateway sent them."""

    def __init__(self, handlers: dict[str, Callable[..., Awaitable[Any]]], key: bytes,
                 on_disconnect: Callable[[int], None] | None = None):
        self.handlers = handlers
        self.key = key
        self.on_disconnect = on_disconnect
        self._server: asyncio.AbstractServer | None = None
        self._peers: set[_ServerConnection] = set()
        self._next_peer = 0
        self.address: LinkAddress | None = None

    async def start(self, host: str) -> LinkAddress:
        if self._server is None:
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(lambda: _ServerConnection(self), host, 0)
            port = self._server.sockets[0].getsockname()[1]
            self.address = LinkAddress(host, port, self.key)
        return self.address

    async def stop(self) -> None:
        """Stops listening and drops every peer (their pending calls fail with LinkLost)."""
        if self._server is not None:
            self._server.close()
            for peer in list(self._peers):
                peer.transport.abort()
            await self._server.wait_closed()
            self._server = None


class _ServerConnection(_Framer):
    def __init__(self, server: LinkServer):
        super().__init__()
        self.server = server
        server._next_peer += 1
        self.peer = server._next_peer
        self.authenticated = False
        self.nonce = secrets.token_bytes(NONCE_BYTES)
        self.context = contextvars.copy_context()
        self.context.run(current_peer.set, self.peer)
        self._timeout: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.server._peers.add(self)
        self.send(0, MAGIC + self.nonce)
        self._timeout = asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT_S, self._handshake_timed_out)

    def _handshake_timed_out(self) -> None:
        if not self.authenticated:
            self.transport.abort()

    def on_frame(self, request_id: int, payload) -> None:
        if not self.authenticated:
            proof, client_nonce = bytes(payload[:PROOF_BYTES]), bytes(payload[PROOF_BYTES:])
            if len(client_nonce) != NONCE_BYTES or not hmac.compare_digest(proof, _proof(self.server.key, b"c", self.nonce)):
                log.warning("link: rejected a peer from %s that does not hold the key", self.transport.get_extra_info("peername"))
                self.transport.abort()
                return
            self.authenticated = True
            self._timeout.cancel()
            self.max_frame = MAX_PAYLOAD_BYTES
            self.send(0, _proof(self.server.key, b"s", client_nonce))
            return
        method, args = pickle.loads(payload)
        # The task runs in this connection's context, so current_peer names this connection.
        asyncio.get_running_loop().create_task(self._answer(request_id, method, args), context=self.context)

    async def _answer(self, request_id: int, method: str, args: tuple) -> None:
        handler = self.server.handlers.get(method)
        try:
            if handler is None:
                raise AttributeError(f"replica has no link method {method!r}")
            reply = (True, await handler(*args))
        except Exception as e:
            reply = (False, f"{type(e).__name__}: {e}")
        self.send(request_id, pickle.dumps(reply, protocol=5))

    def connection_lost(self, exc) -> None:
        self.server._peers.discard(self)
        if self._timeout is not None:
            self._timeout.cancel()
        if self.authenticated and self.server.on_disconnect is not None:
            self.server.on_disconnect(self.peer)


def node_host() -> str:
    """The address other nodes reach this Ray node at (loopback when Ray is not running)."""
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:
        return "127.0.0.1"


# ---- the gateway's side ------------------------------------------------------------------------

class ReplicaLink(_Framer):
    """One authenticated connection to a replica, multiplexing calls; lives on one event loop.

    A reply resolves its call's future straight from the socket's read callback."""

    def __init__(self, address: LinkAddress, on_lost: Callable[[str], None] | None):
        super().__init__()
        self.address = address
        self._on_lost = on_lost
        self._pending: dict[int, Callable[[Any, BaseException | None], None]] = {}
        self._next_id = 0
        self._nonce = secrets.token_bytes(NONCE_BYTES)
        self._stage = 0  # 0: wait for the replica's hello, 1: for its proof, 2: open
        self.ready = asyncio.get_running_loop().create_future()
        self.closed = False

    @classmethod
    async def connect(cls, address: LinkAddress, timeout_s: float = HANDSHAKE_TIMEOUT_S,
                      on_lost: Callable[[str], None] | None = None) -> "ReplicaLink":
        """Connects and runs the mutual handshake; on_lost(reason) runs once if the connection later drops."""
        loop = asyncio.get_running_loop()
        link = cls(address, on_lost)
        await asyncio.wait_for(loop.create_connection(lambda: link, address.host, address.port), timeout_s)
        try:
            await asyncio.wait_for(asyncio.shield(link.ready), timeout_s)
        except BaseException:
            link.close()
            raise
        return link

    def on_frame(self, request_id: int, payload) -> None:
        if self._stage == 0:
            hello = bytes(payload)
            if not hello.startswith(MAGIC) or len(hello) != len(MAGIC) + NONCE_BYTES:
                raise ConnectionError(f"{self.address!r} does not speak the replica link protocol {MAGIC!r}")
            self._stage = 1
            self.send(0, _proof(self.address.key, b"c", hello[len(MAGIC):]) + self._nonce)
        elif self._stage == 1:
            if not hmac.compare_digest(bytes(payload), _proof(self.address.key, b"s", self._nonce)):
                raise ConnectionError(f"{self.address!r} did not prove it holds the replica's key")
            self._stage = 2
            self.max_frame = MAX_PAYLOAD_BYTES
            if not self.ready.done():
                self.ready.set_result(None)
        else:
            ok, value = pickle.loads(payload)
            on_reply = self._pending.pop(request_id, None)
            if on_reply is not None:
                _deliver(on_reply, value if ok else None, None if ok else ReplicaCallError(value))

    def call_then(self, method: str, args: tuple, on_reply: Callable[[Any, BaseException | None], None]) -> None:
        """Sends at once (so calls reach the replica in call order) and runs on_reply(value, None),
        or on_reply(None, error) with ReplicaCallError or LinkLost, straight from the socket's read
        callback: no task or future stands between the reply and its consumer."""
        if self.closed:
            asyncio.get_running_loop().call_soon(_deliver, on_reply, None, LinkLost("link to the replica is closed"))
            return
        self._next_id += 1
        self._pending[self._next_id] = on_reply
        self.send(self._next_id, pickle.dumps((method, args), protocol=5))

    def call(self, method: str, *args: Any) -> asyncio.Future:
        """call_then with a future for the reply."""
        fut = asyncio.get_running_loop().create_future()

        def settle(value: Any, error: BaseException | None) -> None:
            if not fut.done():
                fut.set_result(value) if error is None else fut.set_exception(error)

        self.call_then(method, args, settle)
        return fut

    def send_and_forget(self, method: str, *args: Any) -> None:
        """A call whose answer nobody waits for (a lost link has nothing left to clean up)."""
        self.call_then(method, args, lambda value, error: None)

    def fail(self, exc: BaseException) -> None:
        log.error("link to %r: %s", self.address, exc)
        self._shut(f"broke ({type(exc).__name__}: {exc})")

    def connection_lost(self, exc) -> None:
        self._shut(f"connection lost ({type(exc).__name__ if exc else 'closed by the replica'})")

    def _shut(self, reason: str, report: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        error = LinkLost(f"link to the replica {reason}")
        if not self.ready.done():
            self.ready.set_exception(error)
            self.ready.exception()  # connect() may have stopped waiting: do not warn about it
        pending, self._pending = self._pending, {}
        for on_reply in pending.values():
            _deliver(on_reply, None, error)
        if report and self._on_lost is not None and self._stage == 2:
            self._on_lost(reason)

    def close(self) -> None:
        """Closes from the gateway's side; in-flight calls fail with LinkLost, on_lost is not called."""
        self._shut("closed by the gateway", report=False)


def _deliver(on_reply: Callable[[Any, BaseException | None], None], value: Any, error: BaseException | None) -> None:
    try:
        on_reply(value, error)
    except Exception:  # the consumer's bug must not be taken for a broken connection
        log.exception("link: a reply's consumer failed")


class BlockingLink:
    """A synchronous client for scripts (benchmarks, debugging): one call at a time."""

    def __init__(self, address: LinkAddress, timeout_s: float = HANDSHAKE_TIMEOUT_S):
        self._sock = socket.create_connection((address.host, address.port), timeout=timeout_s)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            _, hello = self._read_frame(HANDSHAKE_MAX_BYTES)
            if not hello.startswith(MAGIC) or len(hello) != len(MAGIC) + NONCE_BYTES:
                raise ConnectionError(f"{address!r} does not speak the replica link protocol {MAGIC!r}")
            nonce = secrets.token_bytes(NONCE_BYTES)
            self._write(0, _proof(address.key, b"c", hello[len(MAGIC):]) + nonce)
            _, proof = self._read_frame(HANDSHAKE_MAX_BYTES)
            if not hmac.compare_digest(proof, _proof(address.key, b"s", nonce)):
                raise ConnectionError(f"{address!r} did not prove it holds the replica's key")
        except (OSError, ConnectionError):
            self._sock.close()
            raise ConnectionError(f"replica link handshake with {address!r} failed") from None
        self._sock.settimeout(None)
        self._next_id = 0

    def _recv(self, n: int) -> bytearray:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = self._sock.recv_into(view[got:])
            if k == 0:
                raise LinkLost("link to the replica closed")
            got += k
        return buf

    def _read_frame(self, limit: int) -> tuple[int, bytes]:
        request_id, size = HEADER.unpack(self._recv(HEADER.size))
        if size > limit:
            raise ConnectionError(f"peer announced a {size}-byte frame; the limit here is {limit}")
        return request_id, bytes(self._recv(size))

    def _write(self, request_id: int, payload: bytes) -> None:
        for part in _frames(request_id, payload):
            self._sock.sendall(part)

    def call(self, method: str, *args: Any) -> Any:
        self._next_id += 1
        self._write(self._next_id, pickle.dumps((method, args), protocol=5))
        request_id, payload = self._read_frame(MAX_PAYLOAD_BYTES)
        if request_id != self._next_id:
            raise ConnectionError(f"reply {request_id} to request {self._next_id}")
        ok, value = pickle.loads(payload)
        if not ok:
            raise ReplicaCallError(value)
        return value

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "BlockingLink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
