"""On a CUDA machine: the fast paths a GPU replica takes by default (fused kernels, attention
registry, channels-last, CUDA graphs) and FP8 give the images the plain diffusers modules give,
graphs are replayed per bucket, and the graph cache stays within its budget.

Skipped where there is no GPU; the device run executes them with `-m gpu`.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch

from rtdiff_cluster.config import FastPathConfig, ModelConfig
from rtdiff_cluster.engine import fastpaths
from rtdiff_cluster.engine.pipeline import BatchSpec, FrameSpec, Pipeline
from rtdiff_cluster.models.registry import load_model
from rtdiff_cluster.parallel import groups

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# bf16 images of random-weight models: the fast paths reorder bf16 sums (fused norms, another
# attention kernel), which moves pixels by a few levels; PyTorch's own bf16 run differs from its
# fp32 run by more than that. Mean and max bounds in 0..255 levels.
BF16_MEAN_LEVELS, BF16_MAX_LEVELS = 2.0, 40


@pytest.fixture(autouse=True)
def single_rank():
    groups.init_single(torch.device("cuda"))
    yield
    groups.destroy()
    torch.cuda.empty_cache()


def pipelines(source: str, **fast):
    """(diffusers' plain modules, the fast paths, their FastPaths). Graphs are captured on the spot
    unless a test asks for graph_capture_aside (the tests of it do)."""
    plain = Pipeline(load_model(ModelConfig(source=source, device="cuda")), prompt_cache_size=2)
    model = load_model(ModelConfig(source=source, device="cuda"))
    cfg = FastPathConfig(**{"graph_capture_aside": False, **fast})
    fp = fastpaths.apply(model, cfg, world=1)
    return plain, Pipeline(model, prompt_cache_size=2, graphs=fp.graphs, loop_graph_max_steps=cfg.loop_graph_max_steps), fp


def frame(p, size, steps, seeds=(1,), guidance=3.0, sampler=""):
    batch = BatchSpec(size, size, steps, guidance, 0.0, [FrameSpec("a lighthouse", seed=s) for s in seeds],
                      sampler=sampler)
    images, _ = p.run(batch, ["a lighthouse"] * len(seeds), [""] * len(seeds))
    return images.astype(int)


def assert_images_close(a, b, what):
    diff = np.abs(a - b)
    assert a.shape == b.shape and diff.mean() < BF16_MEAN_LEVELS and diff.max() <= BF16_MAX_LEVELS, (
        f"{what}: mean {diff.mean():.2f}, max {diff.max()} levels")


@pytest.mark.parametrize("source", ["synthetic:tiny-sdxl", "synthetic:tiny-flux"])
@pytest.mark.parametrize("steps", [2, 12])  # 2: the whole loop is one graph; 12: a graph per step plus the decode's
def test_fast_paths_match_plain_modules_and_replay_graphs(source, steps):
    plain, fast, fp = pipelines(source)
    assert fp.report["kernels"].startswith("on") and fp.report["cuda_graphs"].startswith("on"), fp.report
    for size, seeds in ((256, (1,)), (320, (2, 3))):
        assert_images_close(frame(fast, size, steps, seeds), frame(plain, size, steps, seeds), f"{source} {size} {steps} steps")
    captured = fp.graphs.stats().captures
    assert captured == (2 if steps == 2 else 4), fp.graphs.stats()  # per size: the loop, or the step and the decode
    again = frame(fast, 256, steps)
    assert fp.graphs.stats().captures == captured, "a seen bucket was captured again"
    assert_images_close(again, frame(plain, 256, steps), "replayed graph")
    assert fp.graphs.stats().bytes > 0


@pytest.mark.parametrize("source", ["synthetic:tiny-sdxl", "synthetic:tiny-flux"])
def test_every_sampler_under_graphs_matches_plain_modules(source):
    """Samplers whose step can be captured run as one loop graph; DDIM's cannot (it reads the
    timestep on the host) and falls back to a graph per backbone call after its first frame."""
    from rtdiff_cluster.engine.samplers import offered

    plain, fast, fp = pipelines(source)
    for sampler in offered(fast.model.limits.family):
        for _ in range(2):  # the first run captures (or finds it cannot), the second replays
            assert_images_close(frame(fast, 256, 3, sampler=sampler), frame(plain, 256, 3, sampler=sampler),
                                f"{source} {sampler}")
    # Steps graphed one by one after DDIM's (integer timesteps) still capture for Euler's float ones.
    assert_images_close(frame(fast, 256, 12, sampler="euler"), frame(plain, 256, 12, sampler="euler"), "euler 12 steps")
    assert fast._uncapturable_loops <= {"ddim"}, fast._uncapturable_loops
    assert all(k[:2] == ("loop", "ddim") for k in fast._eager_keys), fast._eager_keys


@pytest.mark.parametrize("source", ["synthetic:tiny-sdxl", "synthetic:tiny-flux"])
def test_image_to_image_with_a_graphed_encoder_matches_plain_modules(source):
    from rtdiff_cluster import clips

    plain, fast, fp = pipelines(source)
    for size in (256, 320):
        init = clips.texture(size, size, seed=size)
        batch = BatchSpec(size, size, 4, 3.0, 0.5, [FrameSpec("a lighthouse", seed=2, init_image=init)])
        for _ in range(2):  # capture, then replay
            got, _ = fast.run(batch, ["a lighthouse"], [""])
            want, _ = plain.run(batch, ["a lighthouse"], [""])
            assert_images_close(got.astype(int), want.astype(int), f"{source} image-to-image {size}")
    assert any(k[0] == "encode" for k in fp.graphs._graphs), "the encoder was not captured"


def test_batches_launched_back_to_back_equal_each_run_alone():
    """Pipeline.launch returns before the GPU is done, so the replica can prepare the next batch
    while this one runs: three image-to-image frames launched before any is collected replay the
    same graphs, refill the same pinned upload buffer and must each still get their own images,
    equal to the frame computed on its own."""
    from rtdiff_cluster import clips

    _, fast, _ = pipelines("synthetic:tiny-sdxl")
    batches = [BatchSpec(256, 256, 2, 0.0, 0.5, [FrameSpec("a lighthouse", seed=7 + i, init_image=clips.texture(256, 256, seed=i))])
               for i in range(3)]
    alone = [fast.run(b, ["a lighthouse"], [""])[0] for b in batches]  # also captures the graphs
    launched = [fast.launch(b, ["a lighthouse"], [""]) for b in batches]
    for i, (pending, want) in enumerate(zip(launched, alone)):
        got, times = pending.result()
        assert np.array_equal(got, want), f"frame {i} changed when launched behind the others"
        assert times.denoise_s > 0
    assert not np.array_equal(alone[0], alone[1])  # the frames differ, so a mix-up would show


def test_pinned_uploads_reuse_a_buffer_only_after_its_last_upload():
    """Back-to-back uploads of one shape share a pinned buffer: each must arrive intact, and a
    new shape beyond the bound evicts the least recently used one."""
    from rtdiff_cluster.pinned import PinnedUploads

    rng = np.random.default_rng(0)
    up = PinnedUploads("cuda", max_shapes=1)
    frames = [rng.integers(0, 256, (512, 512, 3), dtype=np.uint8) for _ in range(4)]
    on_device = [up.upload([f]) for f in frames]
    for f, d in zip(frames, on_device):
        assert np.array_equal(d.cpu().numpy()[0], f)
    assert up.nbytes == frames[0].nbytes
    up.upload([frames[0][:256]])
    assert up.nbytes == frames[0][:256].nbytes


def test_graphs_share_one_pool_and_replay_in_any_order():
    """Graphs share a memory pool: a second graph reuses the first one's intermediates instead of
    growing the pool by its own working set, and each graph's outputs (buffers outside the pool)
    survive the other graph's replay."""
    from rtdiff_cluster.engine.graphs import GraphCache

    def fn(x):  # large intermediates, a small output
        h = torch.relu(x @ x.T) * 2
        return (h @ x).sum(1)

    g = torch.Generator(device="cuda").manual_seed(0)
    big, small = (lambda: torch.randn(2048, 256, device="cuda", generator=g)), (lambda: torch.randn(1024, 128, device="cuda", generator=g))
    alone = GraphCache(torch.device("cuda"), 4, 1 << 34)
    alone.call("small", fn, small())
    cache = GraphCache(torch.device("cuda"), 4, 1 << 34)
    cache.call("big", fn, big())
    pool_after_big = cache._pool_bytes
    cache.call("small", fn, small())
    assert cache._pool_bytes - pool_after_big < alone._pool_bytes, (cache._pool_bytes, pool_after_big, alone._pool_bytes)
    for _ in range(3):
        xs, xb = small(), big()
        ys = cache.call("small", fn, xs)
        yb = cache.call("big", fn, xb)  # replayed while the small graph's output is still held
        torch.testing.assert_close(ys, fn(xs), rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(yb, fn(xb), rtol=1e-4, atol=1e-3)
    assert cache.stats().captures == 2

    # A function a graph cannot hold fails its capture; later captures still work (a new pool).
    def host_read(x):
        return x * x.sum().item()

    with pytest.raises(Exception):
        cache.call("host read", host_read, small())
    xs = small()
    torch.testing.assert_close(cache.call("after", lambda x: fn(x) + 1, xs), fn(xs) + 1, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(cache.call("big", fn, xb), fn(xb), rtol=1e-4, atol=1e-3)

    # Over the byte budget everything but the graph just captured goes, with the pool's other users.
    tight = GraphCache(torch.device("cuda"), 4, 1)
    tight.call("big", fn, big())
    tight.call("small", fn, small())
    assert "big" not in tight and "small" in tight and tight.stats().graphs == 1
    torch.testing.assert_close(tight.call("big", fn, xb), fn(xb), rtol=1e-4, atol=1e-3)
    assert tight.stats().captures == 3


def test_a_new_bucket_runs_eagerly_then_is_captured_without_warm_up_runs():
    """engine/graphs.py with eager_first (fast_paths.graph_capture_at_call = 2): a bucket's first
    call runs fn once, eagerly, on the caller's inputs; its second runs fn once more, under capture
    (no warm-up runs), and replays it; later calls only replay. Every call returns fn's result,
    and the graph's output buffers keep the eager outputs' layout (channels-last stays so)."""
    from rtdiff_cluster.engine.graphs import GraphCache

    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(16, 8, 3, 3, device="cuda", generator=g).to(memory_format=torch.channels_last)
    runs = []

    def reference(x):
        y = torch.nn.functional.conv2d(x, w, padding=1)
        return y.relu(), y.float().sum()

    def fn(x):
        runs.append(torch.cuda.is_current_stream_capturing())
        return reference(x)

    cache = GraphCache(torch.device("cuda"), 4, 1 << 34, eager_first=True)
    for call, capturing in enumerate([[False], [False, True], [False, True], [False, True]]):
        x = torch.randn(2, 8, 24, 40, device="cuda", generator=g).to(memory_format=torch.channels_last)
        got = cache.call("conv", fn, x)
        assert runs == capturing, (call, runs)
        assert cache.eager_calls == 1 and cache.captures == (0 if call == 0 else 1)
        want = reference(x)
        torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-2)
        assert got[0].is_contiguous(memory_format=torch.channels_last), (call, got[0].stride())


def capture_beside_a_busy_thread(capture_error_mode: str = "thread_local") -> tuple[list, int, int]:
    """Three new buckets, each captured (warm-up runs, capture) then replayed, while another thread does
    what a replica's waiter and encoder threads do: allocate and sync an event on its own stream,
    copy to the host, copy on the legacy default stream (as nvJPEG does). Returns (the other
    thread's errors, its loops, captures)."""
    import threading

    from rtdiff_cluster.engine.graphs import GraphCache

    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(512, 512, device="cuda", generator=g) / 24

    def reference(x):
        for _ in range(150):  # long enough to record that the other thread runs during it
            x = torch.tanh(x @ w)
        return x

    stop, errors, loops = threading.Event(), [], [0]

    def busy():
        side = torch.cuda.Stream()
        try:
            while not stop.is_set():
                with torch.cuda.stream(side):
                    t = torch.full((256, 256), 0.01, device="cuda")  # an allocation, no random numbers
                    done = torch.cuda.Event()
                    done.record(side)
                    done.synchronize()
                    (t @ t).sum().cpu()
                torch.ones(16, device="cuda").cpu()
                loops[0] += 1
        except Exception as e:  # noqa: BLE001 - reported to the test
            errors.append(e)

    cache = GraphCache(torch.device("cuda"), 8, 1 << 34, capture_error_mode=capture_error_mode)
    thread = threading.Thread(target=busy)
    thread.start()
    try:
        for call in range(9):
            x = torch.randn(64 + 64 * (call // 3), 512, device="cuda", generator=g)
            torch.testing.assert_close(cache.call(("busy", call // 3), reference, x), reference(x), rtol=1e-3, atol=1e-3)
    finally:
        stop.set()
        thread.join()
    return errors, loops[0], cache.captures


def test_a_capture_leaves_the_replicas_other_threads_working():
    """engine/graphs.py captures a new bucket on the compute thread while the replica's waiter and
    encoder threads may still sync and copy. Under torch.cuda.graph's default ("global") mode
    their calls failed the capture and raised in their thread (a live SDXL stream lost a frame);
    captured thread-locally, both sides go on: three captures, every result equal to the eager
    function's, no error in the other thread."""
    errors, loops, captures = capture_beside_a_busy_thread()
    assert not errors, errors
    assert captures == 3 and loops > 0, (captures, loops)


@pytest.mark.parametrize("source", ["synthetic:tiny-sdxl", "synthetic:tiny-flux"])
def test_a_launch_never_waits_for_the_batches_still_running(source):
    """Pipeline.launch queues a batch's GPU work and returns while earlier batches run; that
    overlap holds only if nothing in it synchronises the stream. Once a configuration has run
    (its graphs captured, its scheduler set), launching text-to-image and image-to-image batches
    back to back, with seeds not seen before, makes no synchronising CUDA call (PyTorch's sync
    debug mode raises on any), and the images are those of the same batches run one by one."""
    from rtdiff_cluster import clips

    _, fast, fp = pipelines(source)
    init = clips.texture(256, 256, seed=3)

    def batches(seed):
        return [BatchSpec(256, 256, 2, 3.0, 0.0, [FrameSpec("a lighthouse", seed=seed)]),
                BatchSpec(256, 256, 4, 3.0, 0.5, [FrameSpec("a lighthouse", seed=seed + 1, init_image=init)])]

    for b in batches(1):  # warm-up: captures, the scheduler's configuration, the prompt's encoding
        fast.run(b, ["a lighthouse"], [""])
    alone = [fast.run(b, ["a lighthouse"], [""])[0] for seed in (5, 7) for b in batches(seed)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        launched = [fast.launch(b, ["a lighthouse"], [""]) for seed in (11, 5, 7) for b in batches(seed)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    images = [one.result()[0] for one in launched]
    for got, want in zip(images[2:], alone):
        np.testing.assert_array_equal(got, want)


def test_sdxl_feed_forward_computes_its_geglu_in_one_gemm_within_policy():
    """An SDXL-sized transformer block (1280 features, 1,024 tokens: a 1024 step's inner level) on
    the fast path computes its feed-forward's projection and gating in one Triton GEMM on Hopper,
    also inside a captured graph. Tolerance policy: against the block in fp32, at most twice the
    error of the same fast path with cuBLAS's projection and the geglu kernel apart, plus one ulp
    of the output's scale."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the fused GEGLU GEMM runs on Hopper or newer")
    from diffusers.models.attention import BasicTransformerBlock

    import rtdiff_kernels.linear as linear_mod
    from rtdiff_cluster.ops.fused import geglu_projections_fusable, install_fused

    torch.manual_seed(0)
    reference = BasicTransformerBlock(1280, 20, 64, cross_attention_dim=2048).cuda().eval()
    block = copy.deepcopy(reference).to(torch.bfloat16)
    install_fused(block)
    assert geglu_projections_fusable(block, torch.device("cuda")) == 1
    x = torch.randn(1, 1024, 1280, device="cuda")
    context = torch.randn(1, 77, 2048, device="cuda")
    calls = []
    fused_gemm, switched_on = linear_mod.linear_geglu, linear_mod._FUSED_GEGLU
    assert switched_on, "the fused GEGLU GEMM ships on"
    linear_mod.linear_geglu = lambda *a, **k: calls.append(1) or fused_gemm(*a, **k)
    try:
        with torch.inference_mode():
            exact = reference(x, encoder_hidden_states=context)
            xb, cb = x.bfloat16(), context.bfloat16()
            fused = block(xb, encoder_hidden_states=cb).float()
            assert calls == [1]
            graph = torch.cuda.CUDAGraph()
            block(xb, encoder_hidden_states=cb)  # warm-up on the capture's stream's allocator
            with torch.cuda.graph(graph):
                captured = block(xb, encoder_hidden_states=cb)
            graph.replay()
            torch.testing.assert_close(captured.float(), fused, rtol=0, atol=0)
            linear_mod._FUSED_GEGLU = 0
            apart = block(xb, encoder_hidden_states=cb).float()
    finally:
        linear_mod.linear_geglu, linear_mod._FUSED_GEGLU = fused_gemm, switched_on
    apart_err, fused_err = (apart - exact).abs().max().item(), (fused - exact).abs().max().item()
    assert fused_err <= 2 * apart_err + torch.finfo(torch.bfloat16).eps * exact.abs().max().item(), (fused_err, apart_err)


def _flux_chain_out(blocks, h, c, temb, dtype) -> torch.Tensor:
    """A Flux double block then single blocks on inputs cast to dtype: [text | image] tokens."""
    c2, h2 = blocks[0](h.to(dtype), c.to(dtype), temb.to(dtype))
    for b in blocks[1:]:
        c2, h2 = b(h2, c2, temb.to(dtype))
    return torch.cat([c2, h2], dim=1)


def test_flux_sized_blocks_fused_within_policy_and_capturable():
    """Flux-dev-sized blocks (3,072 features, 24 heads; 1,000 image + 77 text tokens: lengths no
    tile divides) in bf16 through ops/flux_blocks.py's forwards and our attention processors: a
    double block, then two single blocks, the second taking its joint sequence as a view of the
    first's output. Tolerance policy: against the same blocks in fp32, at most twice the error of
    diffusers' own forwards in bf16, plus one ulp of the output's scale. A captured graph of the
    three replays to the eager result bit for bit."""
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    from rtdiff_cluster.ops import processors
    from rtdiff_cluster.ops.attention import AttentionRegistry
    from rtdiff_cluster.ops.fused import install_fused

    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([FluxTransformerBlock(3072, 24, 128)] +
                                 [FluxSingleTransformerBlock(3072, 24, 128) for _ in range(2)]).cuda().eval()
    with torch.no_grad():
        for name, p in blocks.named_parameters():
            if name.endswith("bias") or "norm.linear" in name or "norm1" in name:
                p.normal_(0, 0.05)  # gates, shifts, scales and biases all non-zero
    h, c, temb = (torch.randn(1, 1000, 3072, device="cuda"), torch.randn(1, 77, 3072, device="cuda"),
                  torch.randn(1, 3072, device="cuda"))

    run = lambda bs, dtype: _flux_chain_out(bs, h, c, temb, dtype)  # noqa: E731
    with torch.inference_mode():
        exact = run(blocks, torch.float32).float()
        theirs = run(copy.deepcopy(blocks).bfloat16(), torch.bfloat16).float()
        ours_blocks = copy.deepcopy(blocks).bfloat16()
        processors.install(ours_blocks, AttentionRegistry(), fused=True)
        done = install_fused(ours_blocks)
        assert done["flux double block gated residual+norm"] == 1 and done["flux single block without concatenations"] == 2
        ours = run(ours_blocks, torch.bfloat16)
        run(ours_blocks, torch.bfloat16)  # warm-up on the capture's stream's allocator
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = run(ours_blocks, torch.bfloat16)
        graph.replay()
        torch.testing.assert_close(captured, ours, rtol=0, atol=0)
    ours = ours.float()
    ours_err, theirs_err = (ours - exact).abs().max().item(), (theirs - exact).abs().max().item()
    assert ours_err <= 2 * theirs_err + torch.finfo(torch.bfloat16).eps * exact.abs().max().item(), (ours_err, theirs_err)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9), reason="FP8 needs sm89+")
def test_fp8_flux_sized_blocks_hand_their_gelu_over_quantised():
    """Flux-dev-sized blocks with FP8 linears (the replica's default widths): our forwards, whose
    feed-forwards and single-block proj_out take gelu_tanh_fp8's output. Tolerance policy: against
    the blocks before quantisation run in fp32, at most twice the error of diffusers' forwards on
    the same FP8 weights (FP8's own error, about 1% here, dominates both; ours quantises the GELU
    from fp32 instead of bf16, which flips a few e4m3 roundings, 0.55% apart from diffusers' in
    the first run, and a wrong or lost scale costs order 1)."""
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    from rtdiff_cluster.engine.fastpaths import fp8_linears
    from rtdiff_cluster.ops import processors
    from rtdiff_cluster.ops.attention import AttentionRegistry
    from rtdiff_cluster.ops.fused import install_fused
    from rtdiff_cluster.quant.fp8 import Fp8Linear, fidelity

    torch.manual_seed(1)
    blocks = torch.nn.ModuleList([FluxTransformerBlock(3072, 24, 128)] +
                                 [FluxSingleTransformerBlock(3072, 24, 128) for _ in range(2)]).cuda().bfloat16().eval()
    exact_blocks = copy.deepcopy(blocks).float()
    fp8_linears(blocks, FastPathConfig(), fused_inputs=True)
    assert all(isinstance(m, Fp8Linear) for m in (blocks[0].ff.net[2], blocks[1].proj_mlp, blocks[1].proj_out))
    ours = copy.deepcopy(blocks)
    processors.install(ours, AttentionRegistry(), fused=True)
    install_fused(ours)
    h, c, temb = (torch.randn(1, 1000, 3072, device="cuda").bfloat16(), torch.randn(1, 77, 3072, device="cuda").bfloat16(),
                  torch.randn(1, 3072, device="cuda").bfloat16())

    def run(bs, dtype):
        with torch.inference_mode():
            return _flux_chain_out(bs, h, c, temb, dtype).float()

    exact = run(exact_blocks, torch.float32)
    theirs, mine = fidelity(exact, run(blocks, torch.bfloat16)), fidelity(exact, run(ours, torch.bfloat16))
    assert mine["rel_l2"] <= 2 * theirs["rel_l2"], (mine, theirs)


def test_graph_cache_drops_least_recently_used_within_its_budget():
    _, fast, fp = pipelines("synthetic:tiny-sdxl", max_graphs=2)
    for size in (256, 320, 384):
        frame(fast, size, 2)
    s = fp.graphs.stats()
    assert s.graphs == 2 and s.evictions == 1 and s.captures == 3
    frame(fast, 384, 2)
    assert fp.graphs.stats().captures == 3  # 384 was kept: most recently used
    frame(fast, 256, 2)
    assert fp.graphs.stats().captures == 4  # 256 was the one dropped


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9), reason="FP8 needs sm89+")
def test_fp8_backbone_stays_close_to_bf16():
    """FP8's 3 mantissa bits move a random-weight model's pixels more than bf16 reordering does:
    the bound is looser, and the benchmark reports the fidelity at full size."""
    plain, fast, fp = pipelines("synthetic:tiny-sdxl", quantization="fp8", fp8_min_features=32)
    assert fp.report["fp8"].startswith("on") and not fp.report["fp8"].startswith("on: 0 "), fp.report
    diff = np.abs(frame(fast, 256, 2) - frame(plain, 256, 2))
    assert diff.mean() < 8, diff.mean()


def _kl_vae():
    import diffusers

    from rtdiff_cluster.models.synthetic import PRESETS

    return diffusers.AutoencoderKL(**PRESETS["synthetic:sdxl"].vae)


def _tiny_vae():
    import diffusers

    return diffusers.AutoencoderTiny(latent_channels=4)


@pytest.mark.parametrize("make, patched", [
    (_tiny_vae, {"tiny vae block conv+bias+relu": 20, "upsample nearest": 3}),
    # SDXL's KL VAE: 24 resnets (10 encoder, 14 decoder), 3 upsamplings, 3 downsamplings, the
    # mid-blocks' attention norms and both output heads' GroupNorms.
    (_kl_vae, {"resnet group_norm+silu": 24, "upsample2d nearest": 3, "downsample2d conv bias": 3, "group_norm": 4}),
], ids=["tiny", "kl"])
def test_fused_vae_within_policy_and_capturable(make, patched):
    """A VAE as a replica serves it (fastpaths.prepare_vae: the tiny VAE's cuDNN
    conv+bias+add+ReLU blocks, the KL VAE's GroupNorm+SiLU resnets and its attention through the
    registry; both with our upsampling kernel) in bf16, channels-last, at an awkward size: its
    error against the fp32 modules may be at most twice the unpatched bf16 modules' error plus one
    bf16 ulp at the output's scale (the tolerance policy); and it replays inside a CUDA graph to
    the same bits as eagerly."""
    import copy

    from rtdiff_cluster.ops.attention import AttentionRegistry

    torch.manual_seed(0)
    ref = make().cuda().eval().requires_grad_(False)
    plain = copy.deepcopy(ref).to(torch.bfloat16).to(memory_format=torch.channels_last)
    ours = copy.deepcopy(plain)
    registry = AttentionRegistry()
    done = fastpaths.prepare_vae(ours, registry, kernels=True)
    assert done["kernels"] == fastpaths._counts(patched), done
    g = torch.Generator(device="cuda").manual_seed(3)
    z = torch.randn(1, 4, 40, 24, device="cuda", generator=g)
    img = torch.rand(1, 3, 320, 192, device="cuda", generator=g) * 2 - 1
    encoded = (lambda m, t: m.encode(t).latents) if hasattr(ref, "latent_magnitude") else (
        lambda m, t: m.encode(t).latent_dist.mean)
    cases = {"decode": (lambda m, t: m.decode(t).sample, z), "encode": (encoded, img)}
    with torch.inference_mode():
        for what, (run, x) in cases.items():
            low = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
            want = run(ref, x)
            torch_err = (run(plain, low).float() - want).abs().max().item()
            got = run(ours, low)
            err = (got.float() - want).abs().max().item()
            ulp = torch.finfo(torch.bfloat16).eps * want.abs().max().item()
            assert err <= 2 * torch_err + ulp, f"{what}: error {err:.3g} > 2 x {torch_err:.3g} + {ulp:.3g}"

            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                run(ours, low)  # warm-up off the capture (cuDNN picks its plans)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = run(ours, low)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, got), f"{what}: the graph replay differs from the eager call"
    if make is _kl_vae:  # its 512-wide head went to the GEMM backend
        assert set(registry.choices().values()) == {"blocked matmul"}, registry.choices()


def test_chunk_cached_frames_computed_smaller_come_back_at_the_asked_size():
    """The governor's size rungs: a chunk-cached frame computed at half size is resized on the GPU,
    whether computed whole, from a region or answered from the cache, to within rounding of the
    host's bilinear resize; the cache itself keeps the computed size."""
    from rtdiff_cluster import clips, imaging
    from rtdiff_cluster.cache.chunk_cache import CacheSettings, StreamFrameCache
    from rtdiff_cluster.engine.pipeline import StageTimes
    from rtdiff_cluster.engine.stream_frames import run_cached

    def compute(b):  # a deterministic image-to-image function standing in for the model
        img = b.frames[0].init_image
        img = img.cpu().numpy() if isinstance(img, torch.Tensor) else img
        return (255 - img)[None], StageTimes()

    cache = StreamFrameCache("cuda")
    settings = CacheSettings(chunk_px=32, threshold=2.0, halo_px=16, max_region_fraction=0.6, region_buckets=4,
                             multiple=8)
    first = clips.texture(128, 128, seed=4)
    moved = first.copy()
    moved[40:70, 50:90] = 255 - moved[40:70, 50:90]
    kinds = []
    for frame in (first, first, moved):
        batch = BatchSpec(128, 128, 2, 0.0, 0.5, [FrameSpec("x", seed=1, init_image=frame, stream_id="s",
                                                            output_size=(256, 192))])
        done = run_cached(compute, cache, batch, settings)
        kinds.append(done.plan.kind)
        assert done.pixels.shape == (192, 256, 3)
        want = imaging.resize(cache.output, 256, 192).astype(int)
        diff = np.abs(done.pixels.astype(int) - want)
        assert diff.mean() < 0.5 and diff.max() <= 2, (done.plan.kind, diff.mean(), diff.max())
        assert cache.output.shape == (128, 128, 3)
    assert kinds == ["full", "cache", "region"], kinds


def test_chunk_cached_frames_launched_back_to_back_equal_frames_run_one_by_one():
    """A single-GPU replica launches a stream's chunk-cache frames without waiting for them
    (run_cached's launch): the next frame is planned on a side stream and launched while the last
    one computes, each region is pasted into the cache's device output in stream order, and each
    frame's pixels are copied out before the next paste. Every frame, collected only after all of
    the clip is launched, must equal the same clip run frame by frame to the end (run_cached's
    compute), bit for bit, and the output sizes the governor asks for must hold."""
    from rtdiff_cluster import clips
    from rtdiff_cluster.cache.chunk_cache import CacheSettings, StreamFrameCache
    from rtdiff_cluster.engine.stream_frames import run_cached

    # Captured on the spot (pipelines' default), as the one-by-one run does: aside, launched
    # regions would run whole.
    _, fast, _ = pipelines("synthetic:tiny-sdxl")
    settings = CacheSettings(chunk_px=32, threshold=2.0, halo_px=32, max_region_fraction=0.6, region_buckets=4,
                             multiple=8)
    frames = list(clips.moving(256, 256, 5, area=0.1, step_px=8))
    frames.insert(2, frames[1])  # an unchanged frame: answered from the cache, on the device

    def batch(img, out=None):
        return BatchSpec(256, 256, 2, 0.0, 0.5, [FrameSpec("a lighthouse", seed=3, init_image=img, output_size=out)])

    one_by_one, cache = [], StreamFrameCache("cuda")
    for img in frames:
        one_by_one.append(run_cached(lambda b: fast.run(b, ["a lighthouse"], [""]), cache, batch(img), settings))
    launched, cache = [], StreamFrameCache("cuda")
    for img in frames:
        launched.append(run_cached(None, cache, batch(img), settings,
                                   launch=lambda b, **kw: fast.launch(b, ["a lighthouse"], [""], copy_out=False, **kw)))
    assert [d.plan.kind for d in launched] == [d.plan.kind for d in one_by_one] == \
        ["full", "region", "cache", "region", "region", "region"], [d.plan.kind for d in launched]
    for i, (a, b) in enumerate(zip(launched, one_by_one)):
        assert np.array_equal(a.pixels, b.pixels), f"frame {i} ({a.plan.kind}) differs when launched back to back"
    assert isinstance(cache.output, torch.Tensor) and cache.output.is_cuda
    half = run_cached(None, cache, batch(frames[-1], out=(128, 96)), settings,
                      launch=lambda b, **kw: fast.launch(b, ["a lighthouse"], [""], copy_out=False, **kw))
    assert half.plan.kind == "cache" and half.pixels.shape == (96, 128, 3)


@pytest.mark.parametrize("aside", [False, True])
def test_regions_of_several_streams_share_a_launch(aside):
    """stream_frames.RegionBatch on a GPU: two streams' regions at different places (the clip and
    its mirror image), two frames each, go in one launch, pasted into each stream's device output
    in order; every frame equals the same frames launched one by one (bf16 policy above: another
    batch size reorders bf16 sums). Captures aside: the first batch has no graph, so its frames
    run alone meanwhile (nothing captured on the serving path), and the next batch shares a launch."""
    from rtdiff_cluster import clips
    from rtdiff_cluster.cache.chunk_cache import CacheSettings, StreamFrameCache
    from rtdiff_cluster.engine.stream_frames import RegionBatch, run_cached

    _, fast, fp = pipelines("synthetic:tiny-sdxl", graph_capture_aside=aside)
    settings = CacheSettings(chunk_px=32, threshold=2.0, halo_px=32, max_region_fraction=0.6, region_buckets=4,
                             multiple=8)
    clip = list(clips.moving(256, 256, 5, area=0.1, step_px=8))
    streams = {"a": clip, "b": [np.ascontiguousarray(f[:, ::-1]) for f in clip]}

    def launch(b, **kw):
        return fast.launch(b, ["a lighthouse"] * len(b.frames), [""] * len(b.frames), copy_out=False, **kw)

    def batch(img):
        return BatchSpec(256, 256, 2, 0.0, 0.5, [FrameSpec("a lighthouse", seed=3, init_image=img)])

    def run(frames, regions):
        caches = {sid: StreamFrameCache("cuda") for sid in streams}
        out = []
        for i in frames:
            for sid in streams:
                out.append(run_cached(None, caches[sid], batch(streams[sid][i]), settings, launch=launch,
                                      regions=regions if i else None))
            if regions is not None and i:
                regions.flush()
        return out

    if aside:
        regions = RegionBatch(lambda b, tags: launch(b, defer_capture=True), 4)
        for attempt in range(4):  # each turned-back launch queues its next missing graph aside
            captures = fp.graphs.captures
            done = run([0, 1], regions)
            if regions.launches:
                break
            wait_for_captures_aside(fp.graphs)
        assert regions.launches == 1 and attempt >= 1  # the first batch ran alone, its graphs captured aside
        assert [d.plan.kind for d in done] == ["full", "full", "region", "region"]
        assert fp.graphs.captures == captures  # the batch's launch captured nothing on the serving path
        return
    alone = run([0, 1, 2], None)
    regions = RegionBatch(lambda b, tags: launch(b, defer_capture=True), 4)
    together = run([0, 1, 2], regions)
    assert regions.launches == 2  # frames 1 and 2 of both streams
    places = set()
    for a, b in zip(alone, together):
        assert a.plan.kind == b.plan.kind and a.plan.region == b.plan.region
        if b.plan.kind == "region":
            places.add((b.plan.region.top, b.plan.region.left))
        assert_images_close(b.pixels.astype(int), a.pixels.astype(int), f"{b.plan.kind} frame in a region batch")
    assert len(places) >= 2


def test_dit_stream_regions_attend_to_recorded_keys_and_values_on_the_fast_paths():
    """stream_cache.dit_token_kv on a GPU: a Flux stream's whole frame records its image tokens'
    keys and values (eagerly: a graph would freeze one stream's tensors), and its regions attend to
    them; the frames stay close to the uncached ones."""
    from rtdiff_cluster import clips, fidelity
    from rtdiff_cluster.cache.chunk_cache import CacheSettings, StreamFrameCache
    from rtdiff_cluster.engine.stream_frames import run_cached

    _, fast, fp = pipelines("synthetic:tiny-flux")
    settings = CacheSettings(chunk_px=32, threshold=2.0, halo_px=32, max_region_fraction=0.5, region_buckets=4,
                             multiple=16)
    cache = StreamFrameCache("cuda")
    kinds = []
    for img in clips.moving(256, 256, 3, area=0.1, step_px=8):
        batch = BatchSpec(256, 256, 4, 0.0, 0.5, [FrameSpec("a lighthouse", seed=3, init_image=img)])
        done = run_cached(lambda b: fast.run(b, ["a lighthouse"], [""]), cache, batch, settings, token_px=16)
        kinds.append(done.plan.kind)
        want, _ = fast.run(batch, ["a lighthouse"], [""])
        assert fidelity.psnr(done.pixels, want[0]) >= 25.0, done.plan.kind
    assert kinds == ["full", "region", "region"], kinds
    assert cache.kv.store and all(k.is_cuda for k, _ in cache.kv.store.values())
    assert not any(k[0] in ("loop", "step") and k[-2:] != (32, 32) for k in fp.graphs._graphs if isinstance(k, tuple)), \
        "a region's steps were captured"


def test_after_the_warm_up_new_attention_shapes_skip_cudnn_and_match_the_plain_modules():
    """cuDNN builds a kernel per new shape and Triton autotunes per size bucket (seconds on the
    serving path): once sealed after the warm-up frame, a batch of two and a new resolution run on
    PyTorch's flash, the warm shape stays where it was, and the images still match diffusers'
    modules."""
    if not torch.backends.cuda.cudnn_sdp_enabled():
        pytest.skip("cuDNN attention is off in this PyTorch")
    plain, fast, fp = pipelines("synthetic:tiny-sdxl")
    frame(fast, 128, 2)  # the warm-up frame
    fp.seal_attention()
    assert_images_close(frame(fast, 128, 2, seeds=(1, 2)), frame(plain, 128, 2, seeds=(1, 2)), "batch of two")
    assert_images_close(frame(fast, 192, 2), frame(plain, 192, 2), "new resolution")
    assert_images_close(frame(fast, 128, 2), frame(plain, 128, 2), "the warm shape")
    per_shape = {kind: c for kind, c in fp.registry.choices().items() if c.startswith(("cudnn", "triton (small)"))}
    if not per_shape:
        pytest.skip(f"no per-shape backend took the warm-up's calls here: {fp.registry.choices()}")
    # The new shapes went to a backend that builds nothing per shape: PyTorch's flash, or
    # FlashAttention 4 where it is installed (it compiles once per head dim, at the warm-up).
    builds_nothing = {b.name for b in fp.registry.backends if not b.compiles_per_shape}
    for choice in per_shape.values():
        later = re.fullmatch(r".* \(new shapes: (.+)\)", choice)
        assert later and set(later.group(1).split(", ")) <= builds_nothing, per_shape


@pytest.mark.parametrize("aside", [False, True])
def test_a_batch_size_without_a_graph_replays_captured_sizes_until_it_comes_often(aside):
    """No capture on the serving path for a new batch size that captured sizes can cover: a batch
    of three runs as three replays of the batch-of-one graph, with the images of three lone frames,
    until it came splits_before_capture times; then it gets its own graph: captured on the spot,
    or (graph_capture_aside) on the cache's thread while the batches go on splitting."""
    plain, fast, fp = pipelines("synthetic:tiny-sdxl", graph_capture_aside=aside)
    fast.splits_before_capture = 2
    alone = np.concatenate([frame(fast, 128, 2, seeds=(s,)) for s in (1, 2, 3)])
    wait_for_captures_aside(fp.graphs)  # aside, the batch of one's loop lands after its first frames
    captures, aside_before = fp.graphs.captures, fp.graphs.stats().aside
    for _ in range(2):
        assert_images_close(frame(fast, 128, 2, seeds=(1, 2, 3)), alone, "batch of three as replays")
        assert fp.graphs.captures == captures
    assert_images_close(frame(fast, 128, 2, seeds=(1, 2, 3)), alone, "batch of three, its own graph")
    if aside:
        for _ in range(4):  # each call queues the next graph the batch lacks, and splits meanwhile
            wait_for_captures_aside(fp.graphs)
            assert_images_close(frame(fast, 128, 2, seeds=(1, 2, 3)), alone, "batch of three while capturing aside")
        aside_now = fp.graphs.stats().aside - aside_before
        assert aside_now >= 1 and fp.graphs.captures == captures + aside_now  # none on the serving path
    assert fp.graphs.captures > captures
    assert_images_close(frame(fast, 128, 2, seeds=(1, 2, 3)), frame(plain, 128, 2, seeds=(1, 2, 3)), "vs plain modules")


def wait_for_captures_aside(cache, timeout_s: float = 120.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while cache.pending():
        assert time.monotonic() < deadline, "captures aside did not finish"
        time.sleep(0.01)


def test_a_capture_aside_leaves_the_caller_replaying():
    """GraphCache(aside=True).capture_aside queues a bucket's capture on the cache's thread and
    returns at once; meanwhile the caller replays its other graphs with correct results, then finds
    the new graph captured (counted aside, not on the serving path) and its replays correct. A
    bucket whose capture fails aside goes back to the caller, which then sees the error itself."""
    from rtdiff_cluster.engine.graphs import GraphCache

    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(512, 512, device="cuda", generator=g) / 24

    def fn(x):
        for _ in range(100):
            x = torch.tanh(x @ w)
        return x

    cache = GraphCache(torch.device("cuda"), 8, 1 << 34, aside=True)
    a = torch.randn(64, 512, device="cuda", generator=g)
    torch.testing.assert_close(cache.call("a", fn, a), fn(a), rtol=1e-3, atol=1e-3)
    b = torch.randn(128, 512, device="cuda", generator=g)
    assert cache.capture_aside("b", fn, b)
    b.zero_()  # the caller may overwrite its inputs at once: the capture copied them
    replays = 0
    while cache.pending() or replays < 3:
        x = torch.randn(64, 512, device="cuda", generator=g)
        torch.testing.assert_close(cache.call("a", fn, x), fn(x), rtol=1e-3, atol=1e-3)
        replays += 1
        assert replays < 10_000, "the capture aside did not finish"
    assert "b" in cache and not cache.capture_aside("b", fn, b)
    x = torch.randn(128, 512, device="cuda", generator=g)
    torch.testing.assert_close(cache.call("b", fn, x), fn(x), rtol=1e-3, atol=1e-3)
    st = cache.stats()
    assert (st.captures, st.aside, st.deferred) == (2, 1, 1), st

    def host_read(x):
        return x * x.sum().item()

    assert cache.capture_aside("host read", host_read, a)
    wait_for_captures_aside(cache)
    assert not cache.capture_aside("host read", host_read, a)  # failed aside: the caller's turn
    with pytest.raises(Exception):
        cache.call("host read", host_read, a)
    torch.testing.assert_close(cache.call("a", fn, a), fn(a), rtol=1e-3, atol=1e-3)
    assert torch.randn(4, device="cuda").isfinite().all()  # the default generator works after the failed captures


def test_a_stream_computes_whole_frames_and_its_last_size_while_new_graphs_capture_aside():
    """graph_capture_aside: a chunk-cache region whose graphs are not captured yet is computed as
    a whole frame (the captures go on aside), so a stream never waits for a capture after its first
    frame; once they are ready its regions are computed alone (or, with graphed_regions, a
    region of a new shape as a larger one whose graphs are ready). A frame asked at a size new to the
    stream is computed at the stream's last size meanwhile (computed_size says so) and comes back
    at the asked output size; once its graphs are ready the stream moves to the new size. Whole
    frames match the frame computed plainly; regions stay close to it."""
    from rtdiff_cluster import clips, fidelity
    from rtdiff_cluster.cache.chunk_cache import CacheSettings, StreamFrameCache
    from rtdiff_cluster.engine.stream_frames import run_cached

    _, fast, fp = pipelines("synthetic:tiny-sdxl", graph_capture_aside=True)
    settings = CacheSettings(chunk_px=32, threshold=2.0, halo_px=32, max_region_fraction=0.6, region_buckets=4,
                             multiple=8)

    def batch(img, size=256, out=None, steps=2):
        return BatchSpec(size, size, steps, 0.0, 0.5, [FrameSpec("a lighthouse", seed=3, init_image=img, output_size=out)])

    def launch(b, **kw):
        return fast.launch(b, ["a lighthouse"], [""], copy_out=False, **kw)

    cache = StreamFrameCache("cuda")
    clip = list(clips.moving(256, 256, 14, area=0.1, step_px=8))
    frames, later = clip[:8], clip[8:]
    kinds, region_shapes = [], set()
    for i, img in enumerate(frames):
        deferred = fp.graphs.deferred
        done = run_cached(None, cache, batch(img), settings, launch=launch)
        kinds.append(done.plan.kind)
        if done.plan.kind == "region":
            region_shapes.add((done.plan.region.height, done.plan.region.width))
        want, _ = fast.run(batch(img), ["a lighthouse"], [""])
        if done.plan.kind == "full":
            assert_images_close(done.pixels.astype(int), want[0].astype(int), f"frame {i}, whole")
            assert i == 0 or fp.graphs.deferred > deferred, f"frame {i} was whole without a region to wait for"
        else:
            # tests/test_chunk_cache.py's policy for a region's recomputed chunks (GroupNorm and
            # attention see the region, not the frame): 25 dB; here over the whole frame.
            assert fidelity.psnr(done.pixels, want[0]) >= 25.0, f"frame {i} ({done.plan.kind})"
        wait_for_captures_aside(fp.graphs)
        if i == 0:  # the stream's first frame: its whole frame's encoder, step and decode graphs, on the spot
            serving = fp.graphs.captures - fp.graphs.stats().aside
    assert kinds[0] == "full" and kinds[1] == "full" and "region" in kinds, kinds
    st = fp.graphs.stats()
    assert st.captures - st.aside == serving and st.aside >= 2, st  # after the first frame, only aside

    # A schedule new to the stream (the governor's step rungs): a region of a shape met before
    # runs at once, step by step on that shape's step and decode graphs (queued aside with its
    # first loop), while its loop for the new schedule is captured aside.
    met_again = 0
    for i, img in enumerate(later):
        shape = cache.plan(img, settings).region
        shape = shape and (shape.height, shape.width)
        done = run_cached(None, cache, batch(img, steps=4), settings, launch=launch)
        if shape in region_shapes:
            met_again += 1
            assert done.plan.kind == "region", f"later frame {i}: a region of a shape met before was computed whole"
            want, _ = fast.run(batch(img, steps=4), ["a lighthouse"], [""])
            assert fidelity.psnr(done.pixels, want[0]) >= 25.0, f"later frame {i}"
            break
        wait_for_captures_aside(fp.graphs)
    assert met_again == 1, (region_shapes, "no later region had a shape met before")
    wait_for_captures_aside(fp.graphs)

    # A region of a shape new to the stream (a small change in a corner) is computed as the
    # smallest larger region whose graphs are ready, placed over it, while its own are captured.
    img = later[i].copy()
    img[8:32, 8:32] = 255 - img[8:32, 8:32]
    small = cache.plan(img, settings).region
    assert (small.height, small.width) not in region_shapes, (small, region_shapes)
    deferred = fp.graphs.deferred
    done = run_cached(None, cache, batch(img), settings, launch=launch, graphed_regions=fast.graphed_region_shapes)
    grown = done.plan.region
    assert done.plan.kind == "region" and (grown.height, grown.width) in region_shapes, (done.plan.kind, grown)
    assert grown.top <= small.top and grown.top + grown.height >= small.top + small.height, (grown, small)
    assert grown.left <= small.left and grown.left + grown.width >= small.left + small.width, (grown, small)
    assert fp.graphs.deferred > deferred  # the small region's own graphs were asked for, and are captured aside
    want, _ = fast.run(batch(img), ["a lighthouse"], [""])
    assert fidelity.psnr(done.pixels, want[0]) >= 25.0, "a small change computed as a larger region"
    wait_for_captures_aside(fp.graphs)
    assert fp.graphs.stats().captures - fp.graphs.stats().aside == serving

    # The governor's half size: computed at the stream's 256 until the 128 graphs are ready.
    small = [np.ascontiguousarray(f[::2, ::2]) for f in clips.moving(256, 256, 6, area=0.1, step_px=8)]
    sizes = []
    for img in small:
        done = run_cached(None, cache, batch(img, 128, out=(256, 256)), settings, launch=launch)
        assert done.pixels.shape == (256, 256, 3)
        sizes.append(done.computed_size)
        wait_for_captures_aside(fp.graphs)
    assert sizes[0] == (256, 256) and sizes[-1] is None and cache.output.shape[:2] == (128, 128), sizes
    assert fp.graphs.stats().captures - fp.graphs.stats().aside == serving
