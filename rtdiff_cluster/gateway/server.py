"""The gRPC gateway: validates, admits, batches and routes requests to engine replicas.

Layers: the servicer (this file) turns RPCs into FrameJobs and answers; ModelScheduler
(scheduler.py) queues and batches them; ReplicaSet (router.py) owns the replicas' state; the one
call into the engine is `run_batch(BatchSpec)` over the replica's link (engine/link.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
import uuid
from dataclasses import dataclass, field

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from rtdiff_cluster import imaging
from rtdiff_cluster.config import ModelConfig, ServerConfig
from rtdiff_cluster.engine import samplers
from rtdiff_cluster.engine.group import spawn_replicas
from rtdiff_cluster.gateway.auth import TokenAuthInterceptor, load_tokens, server_credentials
from rtdiff_cluster.gateway.errors import RequestError, invalid
from rtdiff_cluster.gateway.governor import FrameRateGovernor
from rtdiff_cluster.gateway.router import ReplicaSet
from rtdiff_cluster.gateway.scheduler import BatchKey, FrameJob, FrameOutcome, ModelScheduler, StreamPin
from rtdiff_cluster.gateway.validation import (MAX_SEED, check_cache_threshold, check_governor, check_num_images,
                                               check_settings, frame_specs, scaled_size)
from rtdiff_cluster.gc_pauses import freeze_startup_objects
from rtdiff_cluster.metrics.gateway_metrics import GatewayMetrics
from rtdiff_cluster.models.base import ModelLimits
from rtdiff_cluster.proto.rtdiff.v1 import diffusion_pb2 as pb
from rtdiff_cluster.proto.rtdiff.v1 import diffusion_pb2_grpc as pb_grpc

log = logging.getLogger("rtdiff.gateway")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Diffusion"].full_name
UNKNOWN_MODEL_LABEL = "unknown"  # bounded label for requests naming a model we do not serve


@dataclass
class ServedModel:
    limits: ModelLimits | None  # None until the first replica has loaded
    replicas: ReplicaSet
    scheduler: ModelScheduler
    config_replicas: int
    config: ModelConfig
    # Every replica decodes JPEG input frames on its GPU: the gateway reads their headers only
    # (validation.check_input_image) and hands them on compressed. Set when the replicas load.
    decodes_jpeg: bool = False


@dataclass
class _Call:
    """Bookkeeping of one RPC so that it ends with exactly one counted status."""

    method: str
    model: str = UNKNOWN_MODEL_LABEL
    code: grpc.StatusCode = grpc.StatusCode.OK
    jobs: list[FrameJob] = field(default_factory=list)


class Gateway:
    def __init__(self, config: ServerConfig, replicas: dict[str, list] | None = None):
        """replicas: already-spawned ReplicaGroups per served model name (tests share them); else spawned here."""
        self.config = config
        self.metrics = GatewayMetrics(config.fps_window_s)
        self.models: dict[str, ServedModel] = {}
        self.default_model = config.models[0].served_name
        self.draining = False
        self.ready = False
        self._given_replicas = replicas
        self._server: grpc.aio.Server | None = None
        self._health = HealthServicer()
        self._metrics_httpd = None
        self._background: list[asyncio.Task] = []
        self.port = 0
        self.metrics_port = 0

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self, wait_ready: bool = True) -> None:
        """Listens at once (health NOT_SERVING), then loads replicas and turns SERVING."""
        cfg = self.config
        interceptors = []
        tokens = load_tokens(cfg.auth)
        if tokens:
            interceptors.append(TokenAuthInterceptor(tokens, on_reject=self._count_unauthenticated))
        self._server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ])
        pb_grpc.add_DiffusionServicer_to_server(_Servicer(self), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self._server)
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{cfg.host}:{cfg.port}"
        creds = server_credentials(cfg.tls)
        self.port = self._server.add_secure_port(address, creds) if creds else self._server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"port: cannot bind {address}")
        await self._server.start()
        if cfg.metrics_port >= 0:
            from prometheus_client import start_http_server

            self._metrics_httpd, _ = start_http_server(cfg.metrics_port, addr=cfg.host, registry=self.metrics.registry)
            self.metrics_port = self._metrics_httpd.server_port
        log.info("listening for %s on %s:%d (TLS %s, mutual TLS %s, token auth %s); metrics on :%s",
                 SERVICE_NAME, cfg.host, self.port, "on" if creds else "off", "on" if cfg.tls.client_ca_file else "off",
                 "on" if tokens else "off", self.metrics_port if cfg.metrics_port >= 0 else "off")

        for mc in cfg.models:
            name = mc.served_name
            groups = (self._given_replicas or {}).get(name)
            if groups is None:
                log.info("starting %d replica(s) of %s (%s), %d rank(s) each (tp=%d, cfg-parallel=%d)",
                         mc.replicas, name, mc.source, mc.ranks, mc.tp, mc.cfg_parallel)
                groups = spawn_replicas(mc, cfg.stats_interval_s)
            served = ServedModel(None, None, None, len(groups), mc)  # type: ignore[arg-type]
            served.replicas = ReplicaSet(name, groups, self.metrics, mc.warmup,
                                         on_change=lambda s=served: s.scheduler.wake(),
                                         on_down=lambda h, s=served: s.scheduler.fail_pinned(h, RequestError(
                                             grpc.StatusCode.UNAVAILABLE,
                                             f"replica {h.name} holding this stream failed; start a new stream")))
            served.scheduler = ModelScheduler(name, served.replicas, cfg.batching, self.metrics)
            served.scheduler.start()
            self.models[name] = served
        self._background.append(asyncio.create_task(self._load_all()))
        self._background.append(asyncio.create_task(self._poll_stats()))
        if wait_ready:
            await self._background[0]

    async def _load_all(self) -> None:
        t0 = time.perf_counter()
        for name, served in self.models.items():
            infos = await served.replicas.start()
            served.limits = infos[0].limits
            served.decodes_jpeg = all(i.fast_paths.get("jpeg_decode", "").startswith("nvJPEG") for i in infos)
        self.ready = True
        # Before SERVING: the collection that precedes the freeze stops the event loop once, now.
        freeze_startup_objects("gateway")
        if not self.draining:
            for name in ("", SERVICE_NAME):
                await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("all replicas ready after %.2f s; health is SERVING", time.perf_counter() - t0)

    async def _poll_stats(self) -> None:
        while True:
            await asyncio.sleep(self.config.stats_interval_s)
            for served in self.models.values():
                await served.replicas.poll_stats()

    async def drain(self) -> None:
        """Stops taking work (health NOT_SERVING), lets queued and running work finish, answers the rest."""
        if self.draining:
            return
        self.draining = True
        await self._health.enter_graceful_shutdown()
        log.info("draining: health NOT_SERVING, finishing queued work (up to %.0f s)", self.config.drain_timeout_s)
        results = await asyncio.gather(*(m.scheduler.wait_idle(self.config.drain_timeout_s) for m in self.models.values()))
        for served, idle in zip(self.models.values(), results):
            if not idle:
                served.scheduler.fail_all(RequestError(grpc.StatusCode.UNAVAILABLE,
                                                       "server shut down before this frame was computed"))
        log.info("drained")

    async def stop(self, grace_s: float = 5.0, kill_replicas: bool = True) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
        for t in self._background:
            t.cancel()
        for served in self.models.values():
            await served.scheduler.stop()
            await served.replicas.stop(kill=kill_replicas and self._given_replicas is None)
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()

    # ---- helpers for the servicer -----------------------------------------------------------

    def _count_unauthenticated(self, method: str) -> None:
        self.metrics.request_done(UNKNOWN_MODEL_LABEL, method.rsplit("/", 1)[-1], "UNAUTHENTICATED")

    def served(self, name: str) -> tuple[ServedModel, ModelLimits]:
        if self.draining:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        served = self.models.get(name or self.default_model)
        if served is None:
            raise invalid("model", f"unknown model {name!r}; served: {', '.join(sorted(self.models))}")
        if served.limits is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"model {served.replicas.model} is still loading; check health")
        if not served.replicas.up():
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"no replica of model {served.limits.name} is ready; retry")
        return served, served.limits

    def deadline(self, context, now: float) -> float:
        remaining = context.time_remaining()
        limit = self.config.batching.max_queue_time_s
        return now + (min(remaining, limit) if remaining is not None else limit)

    def finish(self, call: _Call) -> None:
        for j in call.jobs:
            if not j.future.done():
                j.future.cancel()
        if call.jobs:
            self.models[call.model].scheduler.withdraw(call.jobs)
        self.metrics.request_done(call.model, call.method, call.code.name)

    def observe(self, model: str, o: FrameOutcome, total_s: float) -> pb.Timing:
        """The frame's Timing; its histograms are recorded just after the answer leaves (call_soon),
        off the request's critical path."""
        asyncio.get_running_loop().call_soon(self._record, model, o, total_s)
        return pb.Timing(queue_ms=o.queue_s * 1e3, batch_wait_ms=o.batch_wait_s * 1e3, text_encode_ms=o.text_encode_s * 1e3,
                         denoise_ms=o.denoise_s * 1e3, decode_ms=o.decode_s * 1e3, encode_ms=o.result.encode_s * 1e3,
                         total_ms=total_s * 1e3, replica_ms=o.replica_s * 1e3)

    def _record(self, model: str, o: FrameOutcome, total_s: float) -> None:
        series = self.metrics.model(model)
        series.frame_latency.observe(total_s)
        for stage, v in (("queue", o.queue_s), ("batch_wait", o.batch_wait_s), ("text_encode", o.text_encode_s),
                         ("denoise", o.denoise_s), ("decode", o.decode_s), ("encode", o.result.encode_s)):
            series.stage[stage].observe(v)


def _applied(o: FrameOutcome, key: BatchKey, governed: bool = False) -> pb.Applied:
    r = o.result
    width, height = r.computed_size or (key.width, key.height)
    return pb.Applied(steps=r.steps, sampler=key.sampler, cache_threshold=r.cache_threshold, governed=governed,
                      psnr_db_vs_reference=r.psnr_db, steps_reused=r.steps_reused, width=width, height=height)


def _image(o: FrameOutcome) -> pb.Image:
    r = o.result
    return pb.Image(format=r.format, data=r.data, width=r.width, height=r.height, channels=3, seed=r.seed)


async def _check(req, served: ServedModel, lim: ModelLimits, prompt_required: bool):
    # Decoding a PNG or JPEG input frame costs milliseconds of CPU: keep it off the event loop. A
    # RAW frame is only viewed in place (microseconds), so it skips the thread hop: a live stream's
    # queue time, which includes this check, was 1.2 ms p50 on the H200's host with the hop.
    # A JPEG the replicas decode is only read to its header here (~25 us): no hop either.
    fmt = req.input_image.format if req.HasField("input_image") else pb.IMAGE_FORMAT_RAW_RGB8
    if fmt == pb.IMAGE_FORMAT_RAW_RGB8 or (fmt == pb.IMAGE_FORMAT_JPEG and served.decodes_jpeg):
        checked = check_settings(req, lim, prompt_required, served.decodes_jpeg)
    else:
        checked = await asyncio.to_thread(check_settings, req, lim, prompt_required)
    if checked.key.step_cache and served.config.ranks > 1:
        raise invalid("step_cache_threshold", f"needs a single-GPU replica; {lim.name} runs on {served.config.ranks} "
                                              f"ranks (tp={served.config.tp}, cfg-parallel={served.config.cfg_parallel})")
    return checked


class _Servicer(pb_grpc.DiffusionServicer):
    def __init__(self, gateway: Gateway):
        self.gw = gateway

    async def Generate(self, request, context):
        gw = self.gw
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        call = _Call("Generate")
        deadline = math.inf
        try:
            served, lim = gw.served(request.model)
            call.model = lim.name
            checked = await _check(request, served, lim, prompt_required=True)
            n = check_num_images(request.num_images, lim)
            if checked.seed + n - 1 > MAX_SEED:
                raise invalid("seed", f"seed + num_images - 1 exceeds {MAX_SEED}")
            deadline = gw.deadline(context, t0)
            call.jobs = [FrameJob(spec, checked.key, t0, deadline, loop.create_future()) for spec in frame_specs(checked, n)]
            served.scheduler.admit(call.jobs)
            if len(call.jobs) == 1:  # the common case, without gather's extra future and callbacks
                outcomes: list[FrameOutcome] = [await call.jobs[0].future]
            else:
                outcomes = await asyncio.gather(*(j.future for j in call.jobs))
            total = loop.time() - t0
            timings = [gw.observe(lim.name, o, total) for o in outcomes]
            slowest = max(timings, key=lambda t: t.denoise_ms + t.decode_ms + t.encode_ms + t.queue_ms)
            return pb.GenerateResponse(model=lim.name, images=[_image(o) for o in outcomes], timing=slowest,
                                       synthetic=lim.synthetic, applied=_applied(outcomes[0], checked.key))
        except RequestError as e:
            call.code = e.code
            await context.abort(e.code, e.message)
        except asyncio.CancelledError:
            call.code = grpc.StatusCode.DEADLINE_EXCEEDED if loop.time() >= deadline else grpc.StatusCode.CANCELLED
            raise
        except Exception as e:
            log.exception("Generate failed")
            call.code = grpc.StatusCode.INTERNAL
            await context.abort(call.code, f"{type(e).__name__}: {e}")
        finally:
            gw.finish(call)

    async def ListModels(self, request, context):
        out = []
        for name, s in self.gw.models.items():
            lim = s.limits
            if lim is None:
                continue
            out.append(pb.ModelInfo(
                name=name, family=lim.family, synthetic=lim.synthetic, size_multiple=lim.size_multiple,
                min_size=lim.min_size, max_size=lim.max_size, default_width=lim.default_width,
                default_height=lim.default_height, min_steps=lim.min_steps, max_steps=lim.max_steps,
                default_steps=lim.default_steps, max_images_per_request=lim.max_images_per_request,
                max_prompt_chars=lim.max_prompt_chars, max_guidance_scale=lim.max_guidance_scale,
                replicas=s.config_replicas, replicas_ready=len(s.replicas.up()), samplers=samplers.offered(lim.family)))
        self.gw.metrics.request_done(UNKNOWN_MODEL_LABEL if not out else self.gw.default_model, "ListModels", "OK")
        return pb.ListModelsResponse(models=out)

    async def StreamGenerate(self, request_iterator, context):
        gw = self.gw
        loop = asyncio.get_running_loop()
        call = _Call("StreamGenerate")
        pin = StreamPin(uuid.uuid4().hex)
        slots = asyncio.Semaphore(gw.config.batching.stream_max_inflight)
        # (frame_id, t0, job, governed, governor epoch) | RequestError | None, in arrival order
        pending: asyncio.Queue = asyncio.Queue()
        governor = FrameRateGovernor()
        opened: list[ServedModel] = []

        async def read() -> None:
            first = True
            try:
                async for req in request_iterator:
                    await slots.acquire()  # flow control: stop reading while the stream has enough in flight
                    t0 = loop.time()
                    if first:
                        served, lim = gw.served(req.model)
                        call.model = lim.name
                        gw.metrics.model(lim.name).streams_active.inc()
                        opened.append(served)
                    else:
                        if gw.draining:
                            raise RequestError(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
                        if req.model and req.model != call.model:
                            raise invalid("model", f"a stream keeps its model: {call.model!r}, got {req.model!r}")
                        pin.check()
                    c = await _check(req, served, lim, prompt_required=first)
                    threshold = check_cache_threshold(req.cache_threshold)
                    cache_config = served.config.stream_cache
                    limits = check_governor(req, c, lim, threshold, cache_config.threshold, cache_config.enabled)
                    governed, epoch, output_size = False, -1, None
                    if limits is not None:
                        rung, governed, epoch = governor.settings(limits)
                        c.key = dataclasses.replace(c.key, steps=rung.steps)
                        threshold = rung.cache_threshold
                        if rung.scale < 1:
                            size = scaled_size(c.key.width, c.key.height, rung.scale, lim)
                            if size != (c.key.width, c.key.height):
                                output_size = (c.key.width, c.key.height)
                                c.key = dataclasses.replace(c.key, width=size[0], height=size[1])
                                # A compressed input frame is resized by the replica, after its decode.
                                if isinstance(c.input_image, np.ndarray):
                                    c.input_image = await asyncio.to_thread(imaging.resize, c.input_image, *size)
                    first = False
                    spec = frame_specs(c, 1, stream_id=pin.stream_id, cache_threshold=threshold,
                                       output_size=output_size)[0]
                    job = FrameJob(spec, c.key, t0, gw.deadline(context, t0), loop.create_future(), pin=pin)
                    call.jobs.append(job)
                    served.scheduler.admit([job])
                    pending.put_nowait((req.frame_id, t0, job, governed, epoch))
            except RequestError as e:
                pending.put_nowait(e)
                return
            except Exception as e:  # a bug must end the call with a status, never leave it hanging
                log.exception("stream reader failed")
                pending.put_nowait(RequestError(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"))
                return
            pending.put_nowait(None)

        reader = asyncio.create_task(read())
        ended = False
        try:
            while True:
                item = await pending.get()
                if item is None:
                    ended = True
                    break
                if isinstance(item, RequestError):
                    raise item
                frame_id, t0, job, governed, epoch = item
                outcome: FrameOutcome = await job.future
                call.jobs.remove(job)
                slots.release()
                total = loop.time() - t0
                if outcome.result.computed_size is None:  # a frame the replica computed at another size says nothing of this rung
                    governor.observe(total, epoch)
                yield pb.FrameResponse(frame_id=frame_id, image=_image(outcome), timing=gw.observe(call.model, outcome, total),
                                       replica=outcome.replica, from_cache=outcome.result.from_cache,
                                       recomputed_fraction=outcome.result.recomputed_fraction,
                                       applied=_applied(outcome, job.key, governed))
        except RequestError as e:
            call.code = e.code
            await context.abort(e.code, e.message)
        except Exception as e:
            log.exception("StreamGenerate failed")
            call.code = grpc.StatusCode.INTERNAL
            await context.abort(call.code, f"{type(e).__name__}: {e}")
        finally:
            if not ended and call.code == grpc.StatusCode.OK:
                # The client went away: grpc cancels the task or closes this generator (GeneratorExit).
                # A cancel that lands after every frame read was answered cannot be told from a
                # half-close (grpc.aio ends the request iterator alike and context.cancelled() stays
                # False): that stream counts OK, which it was for every frame the server read.
                remaining = context.time_remaining()
                call.code = (grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0
                             else grpc.StatusCode.CANCELLED)
            reader.cancel()
            if opened:
                gw.metrics.model(call.model).streams_active.dec()
            if pin.replica is not None and pin.replica.link is not None:
                pin.replica.link.send_and_forget("close_stream", pin.stream_id)  # frees the replica's per-stream state
            gw.finish(call)
