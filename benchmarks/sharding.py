#!/usr/bin/env python
"""Per-step latency of sharded backbones: tp=1 against tp=2 (and cfg-parallel) on the GPUs of one
host, in one run, with the peers, the all-reduce cost, memory, power and a numerical check.

For each model and each layout the GPUs allow, one process per rank (NCCL) builds the preset's
backbone with seeded weights (each rank only its shard), runs warm-up steps, then times steps with
CUDA events (median; ranks start each step together). Reported per layout:

  ms per step, TFLOP/s (FLOPs counted once with torch's FlopCounterMode), scaling efficiency
  T(1) / (n T(n)) against tp=1 on this device, the all-reduce time per step and how much of it
  overlapped compute (from a torch.profiler trace of rank 0), peak GPU memory and weight bytes
  per rank, watts and joules per step per GPU (NVML energy counter over the timed steps), and
  the error of the step's output against a float32 tp=1 reference next to bf16 tp=1's own error.

Peers in the same run: tp=1 is diffusers' model as diffusers runs it (eager); for Flux at tp=2,
diffusers' own tensor parallelism (`enable_parallelism`, DTensor) on the same weights. The step is
the backbone's forward with the batch CFG needs: SDXL at guidance > 1 runs 2 images (unconditional
and conditional) per step at tp-only layouts and 1 per rank group at cfg-parallel 2.

    python benchmarks/sharding.py --models sdxl,flux-dev [--size 1024] [--steps 10] [--out-dir DIR]
    python benchmarks/sharding.py --models tiny-flux --device cpu --size 128   # a dry run on CPU (gloo)

The 8-GPU scaling run (issue 7; `device_run.sh scaling-1024 scaling-video`): a 40 B DiT with
true CFG at tp=1, 2, 4 and 8 and tp=4 x cfg-parallel 2, at 1024 and at a video-sized token count;
its float32 weights fit no GPU, so each layout is checked against the lowest tp that ran:

    python benchmarks/sharding.py --models flux-40b --tps 1,2,4,8 --dit-cfg --no-fp32-reference
    python benchmarks/sharding.py --models flux-40b --tps 2,4,8 --dit-cfg --tokens 16384 --no-fp32-reference
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

SEED = 1


# ---- one rank --------------------------------------------------------------------------------

def _inputs(name: str, batch: int, size: int, device, dtype, tokens: int = 0) -> dict:
    """A step's inputs at size x size, or for a DiT at `tokens` image tokens (a grid 64 tokens tall:
    a video-sized sequence) when tokens > 0."""
    from rtdiff_cluster.models.synthetic import PRESETS

    p = PRESETS[f"synthetic:{name}"]
    g = torch.Generator("cpu").manual_seed(123)
    r = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    latent = size // 8
    if p.kind == "flux":
        cfg = p.backbone
        rows, cols = (64, tokens // 64) if tokens else (latent // 2, latent // 2)
        tokens = rows * cols
        ids = torch.zeros(rows, cols, 3)
        ids[..., 1] = torch.arange(rows)[:, None]
        ids[..., 2] = torch.arange(cols)[None, :]
        text = p.extras["max_sequence_length"]
        return dict(hidden_states=r(batch, tokens, cfg["in_channels"]), encoder_hidden_states=r(batch, text, cfg["joint_attention_dim"]),
                    pooled_projections=r(batch, cfg["pooled_projection_dim"]), timestep=torch.full((batch,), 0.7, device=device, dtype=dtype),
                    guidance=torch.full((batch,), 3.5, device=device, dtype=torch.float32),
                    img_ids=ids.reshape(-1, 3).to(device, dtype), txt_ids=torch.zeros(text, 3, device=device, dtype=dtype))
    cfg = p.backbone
    out = dict(sample=r(batch, 4, latent, latent), timestep=torch.tensor(500.0, device=device),
               encoder_hidden_states=r(batch, 77, cfg["cross_attention_dim"]))
    if p.kind == "sdxl":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        out["added_cond_kwargs"] = {"text_embeds": r(batch, pooled),
                                    "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, device=device, dtype=dtype)}
    return out


def _build(name: str, tp: int, rank: int, device, dtype, shard_resnets: bool = True):
    import diffusers

    from rtdiff_cluster.models.synthetic import PRESETS, backbone_meta
    from rtdiff_cluster.models.weights import SyntheticWeights, build
    from rtdiff_cluster.parallel.plans import plan_for

    p = PRESETS[f"synthetic:{name}"]
    plan = plan_for(backbone_meta(f"synthetic:{name}"), shard_resnets=shard_resnets) if tp > 1 else None
    model, _ = build(getattr(diffusers, p.backbone_cls), p.backbone, plan=plan, tp=tp, rank=rank, device=device,
                     dtype=dtype, source=SyntheticWeights(SEED))
    return model


def _energy(device) -> float | None:
    if device.type != "cuda":
        return None
    try:
        from rtdiff_cluster.metrics.gpu_sampler import nvml_handle

        pynvml, h = nvml_handle(device)
        return pynvml.nvmlDeviceGetTotalEnergyConsumption(h) / 1000.0
    except Exception:
        return None


def _comm_stats(prof) -> dict:
    """All-reduce kernel time per profiled step and how much of it overlapped other kernels."""
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    comm = [(e.time_range.start, e.time_range.end) for e in kernels if "nccl" in e.name.lower()]
    compute = sorted((e.time_range.start, e.time_range.end) for e in kernels if "nccl" not in e.name.lower())
    comm_us = sum(b - a for a, b in comm)
    overlap = 0.0
    for a, b in comm:  # compute time inside each communication interval (compute kernels do not overlap each other)
        for c, d in compute:
            if d <= a:
                continue
            if c >= b:
                break
            overlap += min(b, d) - max(a, c)
    return {"allreduce_us": comm_us, "overlap_us": overlap, "allreduce_kernels": len(comm)}


def _module_split(model, step, sync) -> dict:
    """GPU time per step in a UNet's ResNet blocks and in its transformer blocks (CUDA events in
    forward hooks): what sharding the convolutions can win, and what attention and MLP sharding can."""
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    spans: dict[str, list] = {"resnets": [], "transformers": []}
    handles = []
    for module in model.modules():
        kind = "resnets" if isinstance(module, ResnetBlock2D) else "transformers" if isinstance(module, Transformer2DModel) else None
        if kind is None:
            continue

        def pre(m, args):
            m._rtdiff_start = torch.cuda.Event(enable_timing=True)
            m._rtdiff_start.record()

        def post(m, args, out, kind=kind):
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            spans[kind].append((m._rtdiff_start, end))

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    step()
    sync()
    for h in handles:
        h.remove()
    return {kind: sum(a.elapsed_time(b) for a, b in pairs) for kind, pairs in spans.items()}


def run_layout(rank: int, world: int, port: int, job: dict, queue) -> None:
    from rtdiff_cluster.parallel import groups

    try:
        use_cuda = job["device"] == "cuda"
        device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(1)
        layout = groups.Layout(tp=job["tp"], cfg=job["cfg"])
        groups.init(layout, rank, "127.0.0.1", port, device, timeout_s=600)
        dtype = getattr(torch, job.get("dtype_override") or ("bfloat16" if use_cuda else "float32"))
        t0 = time.perf_counter()
        peer = job.get("peer") == "diffusers-dtensor"
        if peer:
            from diffusers import TensorParallelConfig

            model = _build(job["model"], 1, 0, device, dtype)  # whole on each rank; diffusers shards it
            model.enable_parallelism(config=TensorParallelConfig(tp_degree=job["tp"]))
        else:
            model = _build(job["model"], job["tp"], groups.tp_rank(), device, dtype, job.get("shard_resnets", True))
        load_s = time.perf_counter() - t0
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        batch = job["batch"]
        x = _inputs(job["model"], batch, job["size"], device, dtype, job.get("tokens", 0))
        sync = (lambda: torch.cuda.synchronize(device)) if use_cuda else (lambda: None)

        def step():
            out = model(**x).sample
            if layout.cfg > 1:  # the guidance combine of a cfg-parallel step: both branches' outputs on every rank
                groups.all_gather_cfg(out)
            return out

        with torch.inference_mode():
            for _ in range(job["warmup"]):
                out = step()
            sync()
            if use_cuda:
                torch.cuda.reset_peak_memory_stats(device)
            times = []
            e0 = _energy(device)
            w0 = time.perf_counter()
            for _ in range(job["steps"]):
                torch.distributed.barrier() if groups.layout().world > 1 else None
                if use_cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    out = step()
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end))
                else:
                    t = time.perf_counter()
                    out = step()
                    times.append((time.perf_counter() - t) * 1e3)
            wall = time.perf_counter() - w0
            e1 = _energy(device)
            comm = {}
            if layout.world > 1 and use_cuda and rank == 0:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(2):
                        step()
                    sync()
                comm = {k: v / 2 for k, v in _comm_stats(prof).items()}
            elif layout.world > 1:
                for _ in range(2):
                    step()
                sync()
            split = _module_split(model, step, sync) if job.get("module_split") and use_cuda else None
            flops = None
            if job.get("count_flops"):
                from torch.utils.flop_counter import FlopCounterMode

                counter = FlopCounterMode(display=False)
                with counter:
                    step()
                flops = counter.get_total_flops()
            reference_error = None
            if job.get("reference"):
                ref = torch.load(job["reference"], map_location=device)
                diff = (out.float() - ref.float())
                reference_error = {"rel_l2": (diff.norm() / ref.float().norm()).item(), "max_abs": diff.abs().max().item()}
            if job.get("save_output"):
                torch.save(out.float().cpu(), job["save_output"])
        result = {"rank": rank, "ms": times, "load_s": load_s, "weight_bytes": weight_bytes,
                  "peak_bytes": torch.cuda.max_memory_allocated(device) if use_cuda else None,
                  "joules_per_step": (e1 - e0) / job["steps"] if e0 is not None and e1 is not None else None,
                  "watts": (e1 - e0) / wall if e0 is not None and e1 is not None else None,
                  "comm": comm, "flops": flops, "reference_error": reference_error, "module_split_ms": split}
        everyone = groups.gather_object(result)
        if rank == 0:
            queue.put(("ok", everyone))
    except BaseException as e:
        queue.put(("error", f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"))
    finally:
        groups.destroy()


def run_job(job: dict, timeout_s: float) -> dict:
    world = job["tp"] * job["cfg"]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=run_layout, args=(r, world, port, job, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        status, value = queue.get(timeout=timeout_s)
    except Exception as e:
        status, value = "error", f"no result in {timeout_s:.0f} s ({type(e).__name__})"
    for p in procs:
        p.join(60)
        if p.is_alive():
            p.kill()
    if status != "ok":
        return {"error": value}
    return {"ranks": value}


# ---- the run ---------------------------------------------------------------------------------

def layouts(model: str, gpus: int, cuda: bool, tps: list[int] | None = None, dit_cfg: bool = False) -> list[dict]:
    """(tp, cfg, batch, peer, shard_resnets) per layout the GPUs allow; steps with guidance carry
    CFG's batch (SDXL always; a DiT with dit_cfg, as a true-CFG model runs).

    tps: the tensor-parallel degrees to run (default: 1 and 2). A DiT also runs tp=tps[-1]/2 x
    cfg-parallel 2 when dit_cfg is set and that fits the GPUs, and, at tp=2 on CUDA, diffusers'
    own tensor parallelism as the peer."""
    from rtdiff_cluster.models.synthetic import PRESETS

    p = PRESETS[f"synthetic:{model}"]
    unet = p.kind != "flux"
    batch = 2 if unet or dit_cfg else 1  # unconditional and conditional in one batch
    heads = None if unet else p.backbone["num_attention_heads"]
    tps = [t for t in (tps or [1, 2]) if t <= gpus and (heads is None or heads % t == 0)]
    out = []
    for tp in tps:
        out.append(dict(tp=tp, cfg=1, batch=batch, label="tp=1 (diffusers eager)" if tp == 1 else f"tp={tp}"))
        if tp == 2 and unet:
            out.append(dict(tp=2, cfg=1, batch=batch, label="tp=2, ResNets replicated", shard_resnets=False))
            out.append(dict(tp=1, cfg=2, batch=1, label="cfg-parallel 2"))
        elif tp == 2 and cuda:
            out.append(dict(tp=2, cfg=1, batch=batch, label="tp=2 diffusers enable_parallelism (DTensor)",
                            peer="diffusers-dtensor"))
    if gpus >= 4 and unet:
        out.append(dict(tp=2, cfg=2, batch=1, label="tp=2 x cfg-parallel 2"))
    if dit_cfg and not unet and tps and tps[-1] >= 2 and tps[-1] <= gpus:
        half = tps[-1] // 2
        out.append(dict(tp=half, cfg=2, batch=1, label=f"tp={half} x cfg-parallel 2"))
    return out


def stamp(device: str) -> dict:
    cuda = torch.cuda.is_available() and device == "cuda"
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import diffusers

    return {"device": device, "gpus": torch.cuda.device_count() if cuda else 0,
            "gpu_name": torch.cuda.get_device_name(0) if cuda else None, "cpu": cpu, "cpu_cores": os.cpu_count(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
            "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def summarize(job: dict, res: dict, base: tuple[float, int] | None) -> dict:
    """base: (ms, GPUs) of the layout that speedup and scaling efficiency are measured against."""
    row = {k: job[k] for k in ("model", "label", "tp", "cfg", "batch", "size")}
    if "error" in res:
        row["error"] = res["error"].splitlines()[0][:300]
        return row
    ranks = res["ranks"]
    r0 = ranks[0]
    ms = statistics.median(r0["ms"])
    n = job["tp"] * job["cfg"]
    row.update(ms=ms, ms_all=r0["ms"], load_s=r0["load_s"], gpus=n, module_split_ms=r0.get("module_split_ms"),
               weight_gb_per_rank=[r["weight_bytes"] / 1e9 for r in ranks],
               peak_gb_per_rank=[(r["peak_bytes"] or 0) / 1e9 for r in ranks],
               watts_per_gpu=[r["watts"] for r in ranks], joules_per_step=sum(r["joules_per_step"] or 0 for r in ranks) or None,
               reference_error=r0["reference_error"])
    if r0.get("comm"):
        row["allreduce_ms"] = r0["comm"]["allreduce_us"] / 1e3
        row["allreduce_overlap_ms"] = r0["comm"]["overlap_us"] / 1e3
        row["allreduce_kernels"] = r0["comm"]["allreduce_kernels"]
    if base:
        row["speedup"] = base[0] / ms
        row["scaling_efficiency"] = base[0] * base[1] / (n * ms)
    return row


def compare_layouts(saved: list[tuple[dict, Path]]) -> None:
    """Each tp-only layout's bf16 output against the lowest tp that ran (same seed and inputs):
    the numerical check that holds where no float32 reference fits (tp=8 against tp=4 or 2)."""
    if len(saved) < 2:
        return
    base_row, base_path = min(saved, key=lambda rp: rp[0]["tp"])
    base = torch.load(base_path).float()
    for row, path in saved:
        if row is base_row:
            continue
        diff = torch.load(path).float() - base
        row["vs_lowest_tp"] = {"against": base_row["label"], "rel_l2": (diff.norm() / base.norm()).item(),
                               "max_abs": diff.abs().max().item()}


def markdown(result: dict) -> str:
    st = result["device"]
    shape = (f"{result['tokens']} image tokens" if result.get("tokens")
             else f"{result['size']}x{result['size']}")
    lines = [f"# Sharding — {st['date_utc']}", "",
             f"Device: {st['gpus']} x {st['gpu_name']} ({st['cpu_cores']} CPU cores); torch {st['torch']}, "
             f"diffusers {st['diffusers']}, NCCL {st['nccl']}.", "",
             f"Backbone step at {shape}, bf16, synthetic weights; median of "
             f"{result['steps']} timed steps after {result['warmup']} warm-up steps, CUDA events on rank 0.", "",
             "| model | layout | GPUs | batch/group | ms/step | TFLOP/s | speedup | scaling eff. | all-reduce ms (overlapped) "
             "| weights GB/rank | peak GB/rank | W/GPU | J/step | rel. error vs fp32 (bf16 tp=1's) | rel. error vs lowest tp |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    dash = "-"
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['label']} | {r['tp'] * r['cfg']} | {r['batch']} | failed: {r['error']} "
                         "| | | | | | | | | | |")
            continue
        flops = result["flops"].get(r["model"])
        tflops = f"{flops / (r['ms'] / 1e3) / 1e12:.0f}" if flops else dash
        ar = f"{r['allreduce_ms']:.1f} ({r['allreduce_overlap_ms']:.1f})" if "allreduce_ms" in r else dash
        err, base_err = r.get("reference_error"), result["bf16_error"].get(r["model"])
        err_s = f"{err['rel_l2']:.2e} ({base_err:.2e})" if err and base_err else dash
        watts = ", ".join(f"{w:.0f}" for w in r["watts_per_gpu"] if w) or dash
        joules = f"{r['joules_per_step']:.1f}" if r.get("joules_per_step") else dash
        vs = r.get("vs_lowest_tp")
        vs_s = f"{vs['rel_l2']:.2e} ({vs['against']})" if vs else dash
        speedup = f"{r['speedup']:.2f}" if "speedup" in r else dash
        eff = f"{r['scaling_efficiency']:.2f}" if "scaling_efficiency" in r else dash
        lines.append(f"| {r['model']} | {r['label']} | {r['gpus']} | {r['batch']} | {r['ms']:.1f} | {tflops} "
                     f"| {speedup} | {eff} | {ar} "
                     f"| {max(r['weight_gb_per_rank']):.2f} | {max(r['peak_gb_per_rank']):.1f} | {watts} | {joules} | {err_s} "
                     f"| {vs_s} |")
    lines += ["", "TFLOP/s: the step's FLOPs (counted once at tp=1 with FlopCounterMode) over its time, for the whole group. "
              "speedup and scaling efficiency k T(k) / (n T(n)) are against the lowest layout that ran (k GPUs: tp=1 "
              "where the model fits one GPU) of the same model in this run. "
              "all-reduce ms: NCCL kernel time per step on rank 0 and, in parentheses, how much of it ran while other "
              "kernels did. rel. error: ||out - out_fp32|| / ||out_fp32|| of the step's output against a float32 tp=1 "
              "reference, next to the same for bf16 at tp=1 (the policy: at most about twice it); vs lowest tp: the "
              "same measure against the bf16 output of the lowest tensor-parallel degree that ran, same seed."]
    for r in result["rows"]:
        split = r.get("module_split_ms")
        if split and r.get("ms"):
            lines += ["", f"{r['model']} at tp=1: ResNet blocks {split['resnets']:.1f} ms "
                          f"({split['resnets'] / r['ms']:.0%} of the step), transformer blocks {split['transformers']:.1f} ms "
                          f"({split['transformers'] / r['ms']:.0%}), the rest (conv in/out, samplers, embeddings) "
                          f"{r['ms'] - split['resnets'] - split['transformers']:.1f} ms (step timed with hooks in place)."]
    for note in result.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="sdxl,flux-dev")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--gpus", type=int, default=0, help="GPUs to use (default: all visible; on CPU: ranks)")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--timeout", type=float, default=900, help="seconds per layout")
    ap.add_argument("--oversized", default="", help="a preset to try at tp=1 and, with 2 GPUs, tp=2 (e.g. flux-80b)")
    ap.add_argument("--tps", default="1,2", help="tensor-parallel degrees to run, e.g. 1,2,4,8 (those the GPUs and "
                                                 "the model's heads allow)")
    ap.add_argument("--tokens", type=int, default=0,
                    help="DiTs: image tokens per step instead of --size's (a video-sized sequence, e.g. 32768)")
    ap.add_argument("--dit-cfg", action="store_true",
                    help="DiTs: steps carry true CFG's batch of 2, and tp=max/2 x cfg-parallel 2 runs too")
    ap.add_argument("--no-fp32-reference", action="store_true",
                    help="skip the float32 tp=1 reference (a model whose float32 weights do not fit one GPU); the "
                         "bf16 layouts are still compared with the lowest tp that ran")
    args = ap.parse_args()
    try:
        tps = sorted({int(t) for t in args.tps.split(",") if t.strip()})
    except ValueError:
        ap.error(f"--tps: comma-separated integers, got {args.tps!r}")
    if not tps or any(t < 1 or t & (t - 1) for t in tps):
        ap.error(f"--tps: powers of two >= 1, got {args.tps!r}")
    if args.tokens and (args.tokens < 64 or args.tokens % 64):
        ap.error(f"--tokens: a positive multiple of 64, got {args.tokens}")
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast on shared hosts
    gpus = args.gpus or (torch.cuda.device_count() if cuda else 2)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".sharding-tmp"
    tmp.mkdir(exist_ok=True)
    result = {"benchmark": "sharding", "device": stamp(args.device), "size": args.size, "tokens": args.tokens,
              "steps": args.steps, "warmup": args.warmup, "rows": [], "flops": {}, "bf16_error": {}, "notes": []}
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        base = None
        ref_path = tmp / f"{model}-fp32.pt"
        # float32 tp=1 reference output, then every layout compared against it.
        common = dict(model=model, size=args.size, tokens=args.tokens, device=args.device, warmup=1, steps=1)
        plan = layouts(model, gpus, cuda, tps, args.dit_cfg)
        ref = {"error": "skipped (--no-fp32-reference)"}
        if not args.no_fp32_reference:
            print(f"[{model}] float32 reference", file=sys.stderr, flush=True)
            ref_job = dict(common, tp=1, cfg=1, batch=plan[0]["batch"], label="fp32 reference", save_output=str(ref_path))
            if cuda:  # a float32 run needs the dtype switch: run_layout picks bf16 on CUDA, so ask for it explicitly
                ref_job["dtype_override"] = "float32"
            ref = run_job(ref_job, args.timeout)
        if "error" in ref:
            result["notes"].append(f"{model}: no float32 reference ({ref['error'].splitlines()[0][:200]})")
        saved: list[tuple[dict, Path]] = []  # bf16 outputs of the tp-only layouts, for the tp-against-tp check
        for i, lay in enumerate(plan):
            if lay["cfg"] > 1:
                continue_with_ref = False  # a cfg-parallel step computes one branch per rank: other input batch
            else:
                continue_with_ref = "error" not in ref
            first = lay["tp"] == 1 and lay["cfg"] == 1
            out_path = tmp / f"{model}-layout{i}.pt" if lay["cfg"] == 1 and "peer" not in lay else None
            job = dict(common, **lay, warmup=args.warmup, steps=args.steps, count_flops=first, module_split=first,
                       reference=str(ref_path) if continue_with_ref else None,
                       save_output=str(out_path) if out_path else None)
            print(f"[{model}] {lay['label']}", file=sys.stderr, flush=True)
            res = run_job(job, args.timeout)
            if "error" not in res and job["count_flops"]:
                result["flops"][model] = res["ranks"][0]["flops"]
            row = summarize(job, res, base)
            if base is None and lay["cfg"] == 1 and "peer" not in lay and "error" not in row:
                base = (row["ms"], row["gpus"])  # tp=1, or the lowest tp where the model did not fit one GPU
                row["speedup"], row["scaling_efficiency"] = 1.0, 1.0
            if first and row.get("reference_error"):
                result["bf16_error"][model] = row["reference_error"]["rel_l2"]
            result["rows"].append(row)
            if out_path is not None and "error" not in row:
                saved.append((row, out_path))
            print(f"[{model}] {lay['label']}: {row.get('ms', row.get('error'))}", file=sys.stderr, flush=True)
        compare_layouts(saved)
    if args.oversized:
        for tp in [1] + ([2] if gpus >= 2 else []):
            job = dict(model=args.oversized, size=args.size, device=args.device, tp=tp, cfg=1, batch=1, warmup=1, steps=2,
                       label=f"tp={tp}")
            print(f"[{args.oversized}] tp={tp}", file=sys.stderr, flush=True)
            result["rows"].append(summarize(job, run_job(job, args.timeout), None))
    for f in tmp.glob("*.pt"):
        f.unlink()
    tmp.rmdir()
    slug = (result["device"]["gpu_name"] or result["device"]["cpu"] or "cpu").lower()
    slug = "".join(c if c.isalnum() else "-" for c in slug).strip("-")[:32]
    stem = f"sharding-{result['device']['date_utc'][:10]}-{args.device}-{gpus}x-{slug}"
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (out_dir / f"{stem}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
