"""Admission, deadlines and dynamic batching for one model (Triton's dynamic batcher is the model).

Frames wait in one bounded FIFO per model. When a replica has a free slot the batcher takes the
oldest eligible frame, adds later frames with the same batch key, and, while the replica is still
busy with an earlier batch, waits up to max_queue_delay_ms (counted from the oldest frame's
arrival) for the batch to fill; an idle replica gets the batch at once, and so does a batch that
no other caller could join (no caller outside it sent a frame within SOURCE_RECENT_S: a lone
live stream's next frame never waits for company that is not there). Frames of one
stream leave the queue in order and go to the stream's replica, whose single compute thread keeps
that order. Every frame's future is resolved exactly once: with its result, or a RequestError.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass, field

import grpc

from rtdiff_cluster.config import BatchingConfig
from rtdiff_cluster.engine.pipeline import BatchSpec, FrameSpec
from rtdiff_cluster.engine.replica import BatchResult, FrameResult
from rtdiff_cluster.gateway.errors import RequestError
from rtdiff_cluster.gateway.router import ReplicaHandle, ReplicaSet, is_actor_gone
from rtdiff_cluster.metrics.gateway_metrics import GatewayMetrics

log = logging.getLogger("rtdiff.scheduler")

# A caller (a stream, or one unary call) that sent a frame this recently may send another: a
# forming batch waits to fill only while such a caller outside it exists. A live stream sends
# frames tens of milliseconds apart; a second is far longer than any stream's gap between them.
SOURCE_RECENT_S = 1.0


@dataclass(frozen=True)
class BatchKey:
    """What frames must share to be computed together."""

    width: int
    height: int
    steps: int
    guidance_scale: float
    strength: float
    sampler: str = "default"
    target_psnr_db: float = 0.0  # > 0: adaptive steps, `steps` is the budget
    step_cache: float = 0.0  # > 0: the step cache's threshold


@dataclass
class StreamPin:
    """A stream's replica, fixed for the stream's life."""

    stream_id: str
    replica: ReplicaHandle | None = None
    generation: int = -1

    def check(self) -> None:
        if self.replica is not None and (not self.replica.up or self.replica.generation != self.generation):
            raise RequestError(grpc.StatusCode.UNAVAILABLE,
                               f"replica {self.replica.name} holding this stream failed; its state is lost, start a new stream")


@dataclass(eq=False)
class FrameJob:
    spec: FrameSpec
    key: BatchKey
    admitted_at: float
    deadline: float  # loop time; the sooner of the client's deadline and max_queue_time_s
    future: asyncio.Future
    pin: StreamPin | None = None
    picked_at: float | None = None  # when a forming batch first chose it
    source: object = None  # who sent it: the stream's id, or a number per unary call (set by admit)


@dataclass
class FrameOutcome:
    result: FrameResult
    replica: str
    queue_s: float
    batch_wait_s: float
    text_encode_s: float
    denoise_s: float
    decode_s: float
    replica_s: float = 0.0
    done_at: float = field(default=0.0)


class ModelScheduler:
    def __init__(self, model: str, replicas: ReplicaSet, config: BatchingConfig, metrics: GatewayMetrics):
        self.model = model
        self.replicas = replicas
        self.config = config
        self.series = metrics.model(model)
        self.series.queue_capacity.set(config.max_queue_size)
        self.queue: list[FrameJob] = []
        self.changed = asyncio.Event()
        self._running = 0  # batches sent to replicas and not answered yet
        self._task: asyncio.Task | None = None
        self._calls = itertools.count()  # unary calls' source numbers
        self._last_sent: dict[object, float] = {}  # source -> when it last sent a frame

    # ---- admission -------------------------------------------------------------------------

    def admit(self, jobs: list[FrameJob]) -> None:
        """All of a request's frames or none: a full queue answers RESOURCE_EXHAUSTED at once."""
        if len(self.queue) + len(jobs) > self.config.max_queue_size:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"queue of model {self.model} is full ({len(self.queue)} of "
                               f"{self.config.max_queue_size} frames waiting); retry later")
        now = asyncio.get_running_loop().time()
        source = jobs[0].pin.stream_id if jobs and jobs[0].pin is not None else next(self._calls)
        for j in jobs:
            j.source = source
        self._note_source(source, now)
        self.queue.extend(jobs)
        # Whatever can go now goes now, not one event-loop turn later in _loop (a turn of a gateway
        # that is busy with other calls).
        while self._try_dispatch(now)[0]:
            pass
        self._depth_changed()  # wakes the batcher only for frames still queued

    def _note_source(self, source: object, now: float) -> None:
        self._last_sent[source] = now
        if len(self._last_sent) > 256:  # forget the callers that went quiet; keeps the map small
            horizon = now - SOURCE_RECENT_S
            self._last_sent = {s: t for s, t in self._last_sent.items() if t > horizon}

    def _others_may_join(self, jobs: list[FrameJob], now: float) -> bool:
        """Whether a caller outside this batch sent a frame recently, so it may send one that
        joins the batch; when none did, waiting to fill would only delay the batch."""
        mine = {j.source for j in jobs}
        horizon = now - SOURCE_RECENT_S
        return any(t > horizon for s, t in self._last_sent.items() if s not in mine)

    def withdraw(self, jobs: list[FrameJob]) -> None:
        """Removes still-queued frames of a cancelled call: their slots are free at once."""
        ids = {id(j) for j in jobs}
        before = len(self.queue)
        self.queue = [j for j in self.queue if id(j) not in ids]
        if len(self.queue) != before:
            self._depth_changed()

    def fail_pinned(self, replica: ReplicaHandle, error: RequestError) -> None:
        """Queued frames of streams held by a replica that went down can never run."""
        doomed = [j for j in self.queue if j.pin is not None and j.pin.replica is replica]
        self.withdraw(doomed)
        for j in doomed:
            _resolve(j, error=error)

    def _depth_changed(self) -> None:
        self.series.queue_depth.set(len(self.queue))
        self.wake()

    def wake(self) -> None:
        """Something the batcher waits for changed; an empty queue gives it nothing to do, and
        skipping that wake-up keeps it off the event loop on the unbatched fast path."""
        if self.queue:
            self.changed.set()

    def outstanding(self) -> int:
        return len(self.queue) + self._running

    # ---- the batcher loop ------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"batcher-{self.model}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def wait_idle(self, timeout: float) -> bool:
        """Waits until nothing is queued or running; False on timeout."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.outstanding():
            if loop.time() >= end:
                return False
            await asyncio.sleep(0.02)
        return True

    def fail_all(self, error: RequestError) -> None:
        queued, self.queue = self.queue, []
        self._depth_changed()
        for j in queued:
            _resolve(j, error=error)

    def _try_dispatch(self, now: float) -> tuple[bool, float | None]:
        """Dispatches the next batch if it is full or its oldest frame has waited long enough;
        else returns when the forming batch must go at the latest."""
        plan = self._plan(now)
        if plan is None:
            return False, None
        replica, jobs = plan
        fill_by = min(j.admitted_at for j in jobs) + self.config.max_queue_delay_ms / 1000.0
        # An idle replica goes now: waiting for the batch to fill would only idle it (frames that
        # arrive meanwhile batch up behind this one). A busy replica cannot start the batch before
        # its current one ends, so the batch may fill until then, up to max_queue_delay_ms, if
        # anyone could fill it: a frame of the only live stream goes at once (it waited 4.2 ms
        # p50 per frame before, with its replica busy encoding the previous frame).
        if (len(jobs) >= self.config.max_batch_size or now >= fill_by or replica.inflight_batches == 0
                or not self._others_may_join(jobs, now)):
            self._dispatch(replica, jobs, now)
            return True, None
        return False, fill_by

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.changed.clear()
            now = loop.time()
            self._expire(now)
            dispatched, fill_by = self._try_dispatch(now)
            if dispatched:
                continue
            wake = min([j.deadline for j in self.queue] + ([fill_by] if fill_by is not None else []), default=None)
            timeout = None if wake is None else max(0.0, wake - now)
            try:
                await asyncio.wait_for(self.changed.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    def _expire(self, now: float) -> None:
        expired = [j for j in self.queue if j.deadline <= now or j.future.done()]
        if not expired:
            return
        self.withdraw(expired)
        for j in expired:
            _resolve(j, error=RequestError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                           f"deadline passed after {now - j.admitted_at:.3f} s in the queue; never computed"))

    def _plan(self, now: float) -> tuple[ReplicaHandle, list[FrameJob]] | None:
        free = [h for h in self.replicas.up() if h.inflight_batches < self.config.max_inflight_batches_per_replica]
        if not free:
            return None
        blocked: set[str] = set()  # streams with an earlier frame still queued behind us
        seed: FrameJob | None = None
        target: ReplicaHandle | None = None
        batch: list[FrameJob] = []
        for j in self.queue:
            sid = j.pin.stream_id if j.pin else None
            if sid in blocked:
                continue
            if seed is None:
                want = j.pin.replica if j.pin and j.pin.replica else None
                if want is None or want in free:
                    seed, target = j, want or self.replicas.least_loaded(free)
                    batch.append(j)
                    continue
            elif (j.key == seed.key and len(batch) < self.config.max_batch_size
                  and (j.pin is None or j.pin.replica in (None, target))):
                batch.append(j)
                continue
            if sid is not None:
                blocked.add(sid)
        if seed is None:
            return None
        for j in batch:
            if j.picked_at is None:
                j.picked_at = now
        return target, batch

    def _dispatch(self, replica: ReplicaHandle, jobs: list[FrameJob], now: float) -> None:
        self.withdraw(jobs)
        for j in jobs:
            if j.pin is not None and j.pin.replica is None:  # a stream's first frame pins it here
                j.pin.replica, j.pin.generation = replica, replica.generation
        key = jobs[0].key
        spec = BatchSpec(key.width, key.height, key.steps, key.guidance_scale, key.strength, [j.spec for j in jobs],
                         sampler=key.sampler, target_psnr_db=key.target_psnr_db, step_cache=key.step_cache)
        work = float(len(jobs) * key.steps * key.width * key.height)
        replica.begin(work)
        self.series.batch_size.observe(len(jobs))
        self.series.replica(replica.name).inflight.set(replica.inflight_batches)
        # Sent now, so the replica sees batches in dispatch order (streams rely on it); answered from
        # the link's read callback, without a task or future in between (each costs an event-loop turn).
        self._running += 1
        replica.link.call_then("run_batch", (spec,),
                               lambda result, error: self._answer(replica, jobs, result, error, work, now))

    def _answer(self, replica: ReplicaHandle, jobs: list[FrameJob], result: BatchResult | None,
                error: BaseException | None, work: float, sent_at: float) -> None:
        self._running -= 1
        replica.end(work)
        self.series.replica(replica.name).inflight.set(replica.inflight_batches)
        self.wake()
        if error is not None:
            if is_actor_gone(error):
                self.replicas.mark_down(replica, type(error).__name__)
                failure = RequestError(grpc.StatusCode.UNAVAILABLE,
                                       f"replica {replica.name} died while computing this frame; retry")
            else:
                log.error("replica %s failed a batch: %s", replica.name, error)
                failure = RequestError(grpc.StatusCode.INTERNAL, f"replica {replica.name} failed: {error}")
            for j in jobs:
                _resolve(j, error=failure)
            return
        loop = asyncio.get_running_loop()
        done_at = loop.time()
        computed = 0
        for j, fr in zip(jobs, result.frames):
            if fr.error:
                _resolve(j, error=RequestError(grpc.StatusCode[fr.error_code], fr.error))
                continue
            computed += 1
            picked = j.picked_at if j.picked_at is not None else sent_at
            text_s, denoise_s, decode_s = fr.stage_s or (result.text_encode_s, result.denoise_s, result.decode_s)
            _resolve(j, outcome=FrameOutcome(
                fr, replica.name, queue_s=max(0.0, picked - j.admitted_at), batch_wait_s=max(0.0, sent_at - picked),
                text_encode_s=text_s, denoise_s=denoise_s, decode_s=decode_s, replica_s=result.replica_s, done_at=done_at))
        if computed:  # after the callers' wake-ups, which _resolve scheduled first
            loop.call_soon(self.series.frames_done, replica.name, computed)


def _resolve(job: FrameJob, outcome: FrameOutcome | None = None, error: RequestError | None = None) -> None:
    if job.future.done():  # the caller went away (cancelled) before the answer came
        return
    if error is not None:
        job.future.set_exception(error)
    else:
        job.future.set_result(outcome)
