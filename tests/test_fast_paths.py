"""The fast paths against diffusers' own modules, on CPU (Triton kernels in the interpreter):
our attention processors, the fused-kernel forwards patched into resnets, GEGLU, GELU and adaLN
modules, and what a CPU replica reports. The GPU versions of these checks, with CUDA graphs and
FP8, are in tests/test_gpu_fast_paths.py."""

from __future__ import annotations

import copy

import pytest
import torch

from rtdiff_cluster.config import FastPathConfig, ModelConfig, ServerConfig
from rtdiff_cluster.engine.families import family_for
from rtdiff_cluster.engine.pipeline import _noise_free_step
from rtdiff_cluster.models.registry import load_model
from rtdiff_cluster.ops.attention import AttentionRegistry

# fp32 on CPU: the patched modules compute the same sums in another order (attention backends,
# fused normalisation in blocks): 1e-4 relative to the output's scale bounds that reordering.
FP32_TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=["synthetic:tiny-sdxl", "synthetic:tiny-flux"])
def model(request):
    return load_model(ModelConfig(source=request.param, device="cpu"))


def backbone_output(model, backbone) -> torch.Tensor:
    """One step of the backbone on fixed random latents, through the family's own call."""
    fam = family_for(model)
    cond = [torch.stack(parts) for parts in zip(*fam.encode(["a red fox", "a blue lake"]))]
    h = w = 16
    latents = fam.to_model_layout(torch.randn(2, fam.latent_channels(), h, w, generator=torch.Generator().manual_seed(0)))
    extra = fam.extra_inputs(2, w * 8, h * 8, 3.0, h, w)
    saved, model.backbone = model.backbone, backbone
    try:
        with torch.inference_mode():
            return fam.forward(latents, torch.tensor(500.0), cond, extra)
    finally:
        model.backbone = saved


def loop_outputs(model, backbone, steps) -> list[torch.Tensor]:
    """The backbone's outputs for (latent scale, timestep) pairs under one set of text states,
    as the steps of one batch's loop see them."""
    fam = family_for(model)
    cond = [torch.stack(parts) for parts in zip(*fam.encode(["a red fox", "a blue lake"]))]
    latents = fam.to_model_layout(torch.randn(2, fam.latent_channels(), 16, 16, generator=torch.Generator().manual_seed(0)))
    extra = fam.extra_inputs(2, 128, 128, 3.0, 16, 16)
    saved, model.backbone = model.backbone, backbone
    try:
        with torch.inference_mode():
            return [fam.forward(latents * scale, torch.tensor(t), cond, extra) for scale, t in steps]
    finally:
        model.backbone = saved


def assert_close(out, ref, what):
    err = (out - ref).abs().max().item()
    assert err <= FP32_TOLERANCE * ref.abs().max().item(), f"{what}: max error {err:.3g}"


@pytest.mark.parametrize("backends, fuse", [(["math"], False), (["triton"], False), (["sdpa"], False), (["sdpa"], True)])
def test_attention_processors_match_diffusers(model, backends, fuse):
    import os

    from rtdiff_cluster.ops import processors

    if backends == ["triton"] and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernel runs CPU tensors only in the interpreter (this machine has a GPU)")

    ours = copy.deepcopy(model.backbone)
    kv_matmuls = []
    if fuse:  # q/k/v as one matmul (per stream in Flux's joint attention)
        fused = processors.fuse_projections(ours)
        assert fused > 0
        if model.kind == "flux":  # the single blocks' q/k/v and the double blocks' both streams
            assert fused == sum(type(m).__name__ == "FluxAttention" for m in ours.modules())
            assert all(getattr(m, name, None) is None for m in ours.modules() if type(m).__name__ == "FluxAttention"
                       for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"))
        assert all(getattr(m, "to_k", "absent") is None for m in ours.modules() if getattr(m, "fused_projections", False))
        # ... and every cross-attention's keys and values as one matmul per forward.
        batched = processors.batch_cross_kv(ours)
        cross = [m for m in ours.modules() if getattr(m, "kv_slot", None) is not None]
        assert batched == len(cross) and (batched > 1) == (model.kind == "sdxl"), batched
        assert all(m.to_kv is None for m in cross)
        if batched:
            ours.rtdiff_cross_kv.proj.register_forward_hook(lambda *_: kv_matmuls.append(1))
    registry = AttentionRegistry(allowed=backends)
    n = processors.install(ours, registry, fused=False)
    assert n > 0
    assert_close(backbone_output(model, ours), backbone_output(model, model.backbone), f"processors on {backends}")
    assert set(registry.choices().values()) == set(backends), registry.choices()
    if fuse and model.kind == "sdxl":
        assert len(kv_matmuls) == 1, f"{len(kv_matmuls)} K/V matmuls in one forward"
        assert ours.rtdiff_cross_kv._out is None  # not held after the forward
        backbone_output(model, ours)  # a second forward (new text states) computes its own
        assert len(kv_matmuls) == 2
        # Held through a denoising loop: forwards on the same text states project them once and
        # give what unheld forwards give; nothing is held after it.
        steps = ((1.0, 500.0), (0.5, 300.0), (0.25, 100.0))
        unheld = loop_outputs(model, ours, steps)
        assert len(kv_matmuls) == 2 + len(steps)
        with processors.held_across_forwards(ours):
            held = loop_outputs(model, ours, steps)
        assert len(kv_matmuls) == 3 + len(steps) and ours.rtdiff_cross_kv._out is None
        for a, b in zip(held, unheld):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fused_kernels_match_diffusers_modules(model):
    from rtdiff_cluster.ops import fused as fused_mod
    from rtdiff_cluster.ops.fused import batch_time_embeddings, install_fused

    # The synthetic presets' biases are zeros; the fused paths move biases around (conv biases into
    # norms and residual adds, conv1's into the time-embedding matmul), so here they are not.
    reference = copy.deepcopy(model.backbone)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    ours = copy.deepcopy(reference)
    done = install_fused(ours)
    # Every fused resnet's time-embedding projection (and conv1's bias) as one matmul per forward.
    batched = batch_time_embeddings(ours)
    resnets = [m for m in ours.modules() if getattr(m, "temb_slot", None) is not None]
    assert batched == len(resnets) and (batched > 1) == (model.kind == "sdxl"), batched
    assert all(m.time_emb_proj is None and fused_mod._bias_handed_back(m.conv1) and m.conv1.bias is not None
               for m in resnets)  # every conv1 bias went into the stacked projection
    temb_matmuls = []
    if batched:
        ours.rtdiff_time_embeddings.proj.register_forward_hook(lambda *_: temb_matmuls.append(1))
    expected = ({"resnet group_norm+silu", "geglu", "group_norm", "transformer block add+layer_norm",
                 "transformer2d channels-last output", "transformer2d chained blocks", "upsample2d nearest",
                 "downsample2d conv bias"}
                if model.kind == "sdxl"
                else {"linear+gelu_tanh", "adaln_zero", "adaln_continuous", "flux double block gated residual+norm",
                      "flux single block without concatenations"})
    assert expected <= set(done), done
    assert_close(backbone_output(model, ours), backbone_output(model, reference), "fused modules")
    if batched:
        assert len(temb_matmuls) == 1 and ours.rtdiff_time_embeddings._out is None  # once, not kept
        # FP8 after the batching (as benchmarks/roofline.py converts a built model) leaves the one
        # row of conditioning in the model's dtype, as the engine's order does.
        from rtdiff_cluster.engine.fastpaths import fp8_linears

        fp8_linears(ours, FastPathConfig(fp8_min_features=16), fused_inputs=True)
        assert type(ours.rtdiff_time_embeddings.proj[1]) is torch.nn.Linear


def test_feed_forward_takes_the_fused_geglu_gemm_where_switched_on(monkeypatch):
    """With kernels/linear.py's fused GEGLU switched on (its knobs, as benchmarks/unet_profile.py
    --knob sets them), a bf16 transformer block's feed-forward computes its projection and gating in
    one linear_geglu call. Tolerance policy: against the block in fp32, the fused block's error is
    at most twice the error of the same block with the projection and the gating apart (one
    bf16 rounding fewer, so it is if anything smaller), plus one ulp of the output's scale."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the fused kernels run CPU tensors only in Triton's interpreter (this machine has a GPU)")
    from diffusers.models.attention import BasicTransformerBlock

    import rtdiff_kernels.linear as linear_mod
    from rtdiff_cluster.ops.fused import install_fused

    torch.manual_seed(3)
    reference = BasicTransformerBlock(64, 2, 32, cross_attention_dim=48).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    block = copy.deepcopy(reference).to(torch.bfloat16)
    assert install_fused(block)["feed-forward geglu"] == 1
    x, context = torch.randn(2, 40, 64), torch.randn(2, 7, 48)
    for name, value in {"_FUSED_GEGLU": 0, "_GEGLU_MIN_OUTPUTS": 64 * 64, "_GEGLU_BLOCK_M": 32, "_GEGLU_BLOCK_N": 32,
                        "_GEGLU_BLOCK_K": 32, "_GEGLU_WARPS": 4, "_GEGLU_STAGES": 2, "_GEGLU_GROUP_M": 2,
                        "_GEGLU_TMA": 1, "_GEGLU_PERSISTENT": 0}.items():
        monkeypatch.setattr(linear_mod, name, value)
    calls = []
    fused_gemm = linear_mod.linear_geglu
    monkeypatch.setattr(linear_mod, "linear_geglu", lambda *a, **k: calls.append(1) or fused_gemm(*a, **k))
    with torch.inference_mode():
        exact = reference(x, encoder_hidden_states=context)
        apart = block(x.bfloat16(), encoder_hidden_states=context.bfloat16()).float()
        assert calls == []
        monkeypatch.setattr(linear_mod, "_FUSED_GEGLU", 1)
        fused = block(x.bfloat16(), encoder_hidden_states=context.bfloat16()).float()
        assert calls == [1]
        monkeypatch.setattr(linear_mod, "_GEGLU_MIN_OUTPUTS", 80 * 256 + 1)  # 80 tokens x 256: under it
        block(x.bfloat16(), encoder_hidden_states=context.bfloat16())
        assert calls == [1]
    apart_err, fused_err = (apart - exact).abs().max().item(), (fused - exact).abs().max().item()
    assert fused_err <= 2 * apart_err + torch.finfo(torch.bfloat16).eps * exact.abs().max().item(), (fused_err, apart_err)
    assert not torch.equal(fused, apart)  # the fused path did run: its rounding differs


def _bf16_policy(ours, diffusers_bf16, exact, what):
    """The tolerance policy for a bf16 fast path: against fp32, at most twice the error of
    diffusers' own modules in bf16, plus one bf16 ulp of the output's scale."""
    ours_err, theirs_err = (ours - exact).abs().max().item(), (diffusers_bf16 - exact).abs().max().item()
    bound = 2 * theirs_err + torch.finfo(torch.bfloat16).eps * exact.abs().max().item()
    assert ours_err <= bound, f"{what}: error {ours_err:.3g} against fp32, diffusers' bf16 {theirs_err:.3g}"


def flux_chain(seed: int) -> torch.nn.ModuleList:
    """A Flux double block and two single blocks in miniature (64 features, 2 heads), every
    parameter random: biases and adaLN projections non-zero, so gates, shifts and scales all matter."""
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    torch.manual_seed(seed)
    blocks = torch.nn.ModuleList([FluxTransformerBlock(64, 2, 32)] +
                                 [FluxSingleTransformerBlock(64, 2, 32) for _ in range(2)]).eval()
    with torch.no_grad():
        for p in blocks.parameters():
            p.normal_(0, 0.2)
    return blocks


def run_flux_chain(blocks, h, c, temb, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(text, image) streams after the chain, in fp32; inputs cast to dtype when given."""
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))  # noqa: E731
    with torch.inference_mode():
        c2, h2 = blocks[0](cast(h), cast(c), cast(temb))
        for b in blocks[1:]:
            c2, h2 = b(h2, c2, cast(temb))
    return c2.float(), h2.float()


def test_flux_blocks_fused_within_policy_and_without_the_joint_copy(monkeypatch):
    """A Flux double block and two chained single blocks in bf16, through ops/flux_blocks.py's
    forwards: within the bf16 policy of the same blocks in fp32; the second single block takes
    its joint sequence as a view of the first one's output (no concatenation), the first
    concatenates; proj_out runs as two matmuls over its weight's halves, not as the module on
    a concatenation."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the fused kernels run CPU tensors only in Triton's interpreter (this machine has a GPU)")
    from rtdiff_cluster.ops import flux_blocks
    from rtdiff_cluster.ops.fused import install_fused

    blocks = flux_chain(4)
    h, c, temb = torch.randn(2, 40, 64), torch.randn(2, 7, 64), torch.randn(2, 64)
    exact = run_flux_chain(blocks, h, c, temb, torch.float32)
    theirs = run_flux_chain(copy.deepcopy(blocks).bfloat16(), h, c, temb, torch.bfloat16)
    ours_blocks = copy.deepcopy(blocks).bfloat16()
    done = install_fused(ours_blocks)
    assert done["flux double block gated residual+norm"] == 1 and done["flux single block without concatenations"] == 2
    joins, proj_out_calls = [], []
    joined = flux_blocks._joined

    def spy_join(a, b):
        out = joined(a, b)
        joins.append(out.untyped_storage().data_ptr() == a.untyped_storage().data_ptr())
        return out

    monkeypatch.setattr(flux_blocks, "_joined", spy_join)
    for single in ours_blocks[1:]:
        single.proj_out.register_forward_hook(lambda *_: proj_out_calls.append(1))
    ours = run_flux_chain(ours_blocks, h, c, temb, torch.bfloat16)
    assert joins == [False, True] and proj_out_calls == []
    for o, t, e, what in zip(ours, theirs, exact, ("text stream", "image stream")):
        _bf16_policy(o, t, e, what)
    assert not torch.equal(ours[1], theirs[1])  # the fused forwards did run: their rounding differs


def test_fp8_flux_blocks_hand_their_gelu_over_quantised(monkeypatch):
    """With FP8 linears, a Flux double block's feed-forwards and a single block's proj_out take
    their input from gelu_tanh_fp8 (the single block's with the attention output in front).
    Tolerance policy: against the blocks before quantisation, at most twice the error of
    diffusers' forwards on the same FP8 weights (FP8's own error dominates both; a lost or
    misplaced scale costs order 1). On CPU the FP8 products are dequantised fp32 matmuls."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the fused kernels run CPU tensors only in Triton's interpreter (this machine has a GPU)")
    import rtdiff_kernels.activations as activations
    from rtdiff_cluster.engine.fastpaths import fp8_linears
    from rtdiff_cluster.ops.fused import install_fused
    from rtdiff_cluster.quant.fp8 import Fp8Linear, fidelity

    blocks = flux_chain(6)
    exact_blocks = copy.deepcopy(blocks)
    fp8_linears(blocks, FastPathConfig(fp8_min_features=16), fused_inputs=True)
    assert all(isinstance(m, Fp8Linear) for m in (blocks[0].ff.net[2], blocks[1].proj_mlp, blocks[1].proj_out))
    reference, ours = copy.deepcopy(blocks), copy.deepcopy(blocks)
    install_fused(ours)
    prefixes = []
    quantised = activations.gelu_tanh_fp8
    monkeypatch.setattr(activations, "gelu_tanh_fp8",
                        lambda h, prefix=None: prefixes.append(None if prefix is None else prefix.shape[-1])
                        or quantised(h, prefix))
    h, c, temb = torch.randn(2, 40, 64), torch.randn(2, 7, 64), torch.randn(2, 64)
    run = lambda bs: torch.cat(run_flux_chain(bs, h, c, temb), dim=1)  # noqa: E731
    exact = run(exact_blocks)
    theirs, mine = fidelity(exact, run(reference)), fidelity(exact, run(ours))
    assert mine["rel_l2"] <= 2 * theirs["rel_l2"], (mine, theirs)
    assert sorted(prefixes, key=str) == [64, 64, None, None]  # two single blocks, two feed-forwards


def test_fused_fp8_feed_forwards_hand_over_float8():
    """With FP8 linears, norm3 and the GEGLU hand their outputs to the feed-forward's linears
    already quantised (add_layer_norm_fp8, geglu_fp8), and fp8_linears converts the out
    projections whatever their width. On CPU the FP8 products are dequantised fp32 matmuls.

    Tolerances: one transformer block against diffusers' modules on the same fp8 weights differs
    only in where its activations are quantised (from fp32 inside the kernels, with Triton's erf
    for PyTorch's): an element's e4m3 rounding flips between neighbours only when the two land
    on either side of a boundary, and each flip moves the block's output by about
    2^-4 / sqrt(elements) relative (~1e-3 here); 5e-3 allows a few, where a lost, doubled or
    misplaced scale costs order 1. A whole UNet is not compared that way: a chain of FP8
    layers amplifies any perturbation to FP8's own noise (scaling its weights by 1 + 1e-6 moved
    this tiny UNet's output by 1.8%), so the whole model is held to FP8's bound against fp32
    (0.05, tests/test_fp8.py) and to running the fused kernels once per feed-forward."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the fused kernels run CPU tensors only in Triton's interpreter (this machine has a GPU)")
    from diffusers.models.attention import BasicTransformerBlock, FeedForward

    import rtdiff_kernels.activations as activations
    import rtdiff_kernels.add_layer_norm as add_layer_norm
    from rtdiff_cluster.engine.fastpaths import fp8_linears
    from rtdiff_cluster.ops.fused import install_fused
    from rtdiff_cluster.quant.fp8 import Fp8Linear, fidelity

    model = load_model(ModelConfig(source="synthetic:tiny-sdxl", device="cpu"))
    assert fp8_linears(copy.deepcopy(model.backbone), FastPathConfig(fp8_min_features=1 << 20),
                       fused_inputs=False)["replaced"] == 0  # nothing is that wide
    ours = copy.deepcopy(model.backbone)
    fp8_linears(ours, FastPathConfig(fp8_min_features=1 << 20), fused_inputs=True)
    ffs = [m for m in ours.modules() if isinstance(m, FeedForward)]
    assert ffs and all(isinstance(m.net[2], Fp8Linear) and not isinstance(m.net[0].proj, Fp8Linear) for m in ffs)
    fp8_linears(ours, FastPathConfig(fp8_min_features=16), fused_inputs=True)
    assert all(isinstance(m.net[0].proj, Fp8Linear) for m in ffs)
    block = copy.deepcopy(next(m for m in ours.modules() if isinstance(m, BasicTransformerBlock)))
    reference_block = copy.deepcopy(block)
    assert install_fused(ours)["feed-forward geglu"] == len(ffs)
    install_fused(block)

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 64, block.norm1.normalized_shape[0], generator=g)
    context = torch.randn(2, 7, block.attn2.to_k.in_features, generator=g)
    with torch.inference_mode():
        one = fidelity(reference_block(x, encoder_hidden_states=context), block(x, encoder_hidden_states=context))
    assert one["rel_l2"] <= 5e-3, one

    calls = {"geglu_fp8": 0, "add_layer_norm_fp8": 0}
    saved = activations.geglu_fp8, add_layer_norm.add_layer_norm_fp8

    def counted(fn):
        def wrapper(*args, **kwargs):
            calls[fn.__name__] += 1
            return fn(*args, **kwargs)
        return wrapper

    activations.geglu_fp8, add_layer_norm.add_layer_norm_fp8 = map(counted, saved)
    try:
        out = backbone_output(model, ours)
    finally:
        activations.geglu_fp8, add_layer_norm.add_layer_norm_fp8 = saved
    assert calls == {"geglu_fp8": len(ffs), "add_layer_norm_fp8": len(ffs)}, calls
    assert fidelity(backbone_output(model, model.backbone), out)["rel_l2"] <= 0.05


def test_chained_blocks_hand_their_fp8_qkv_projection_a_quantised_norm1():
    """With q/k/v fused into one FP8 linear behind our processor, a chained block's norm1
    (the previous block's feed-forward added in) writes its output quantised for that linear
    (add_layer_norm_fp8, then Fp8Linear.forward_fp8): one more fused call per chained block, and
    the projection never quantises a bf16 tensor itself there.

    Tolerances as test_fused_fp8_feed_forwards_hand_over_float8's: a transformer of two blocks
    against the same modules quantising norm1's output themselves differs only in where the
    rounding happens (5e-3); the whole UNet is held to FP8's bound against fp32 (0.05)."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the fused kernels run CPU tensors only in Triton's interpreter (this machine has a GPU)")
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    import rtdiff_kernels.add_layer_norm as add_layer_norm
    from rtdiff_cluster.engine.fastpaths import fp8_linears
    from rtdiff_cluster.ops import fused, processors
    from rtdiff_cluster.ops.fused import install_fused
    from rtdiff_cluster.quant.fp8 import Fp8Linear, fidelity

    model = load_model(ModelConfig(source="synthetic:tiny-sdxl", device="cpu"))
    ours = copy.deepcopy(model.backbone)
    assert processors.fuse_projections(ours) > 0
    fp8_linears(ours, FastPathConfig(fp8_min_features=16), fused_inputs=True)
    processors.install(ours, AttentionRegistry(allowed=["sdpa"]), fused=False)
    install_fused(ours)
    transformers = [m for m in ours.modules() if isinstance(m, Transformer2DModel)]
    chained = sum(len(t.transformer_blocks) - 1 for t in transformers)
    assert chained > 0 and all(isinstance(b.attn1.to_qkv, Fp8Linear) for t in transformers for b in t.transformer_blocks)
    ffs = sum(len(t.transformer_blocks) for t in transformers)

    calls = {"add_layer_norm_fp8": 0, "qkv from a quantised input": 0, "qkv quantising itself": 0}
    saved_norm, saved_forward, saved_fp8 = add_layer_norm.add_layer_norm_fp8, Fp8Linear.forward, Fp8Linear.forward_fp8
    qkvs = {id(b.attn1.to_qkv) for t in transformers for b in t.transformer_blocks}

    def counted_norm(*args, **kwargs):
        calls["add_layer_norm_fp8"] += 1
        return saved_norm(*args, **kwargs)

    def counted_forward(self, x):
        calls["qkv quantising itself"] += id(self) in qkvs
        return saved_forward(self, x)

    def counted_fp8(self, *args):
        calls["qkv from a quantised input"] += id(self) in qkvs
        return saved_fp8(self, *args)
    add_layer_norm.add_layer_norm_fp8, Fp8Linear.forward, Fp8Linear.forward_fp8 = counted_norm, counted_forward, counted_fp8
    try:
        out = backbone_output(model, ours)
    finally:
        add_layer_norm.add_layer_norm_fp8, Fp8Linear.forward, Fp8Linear.forward_fp8 = saved_norm, saved_forward, saved_fp8
    # One forward: each transformer's first block (no feed-forward before it) quantises its own
    # input; every other block takes norm1's.
    assert calls == {"add_layer_norm_fp8": ffs + chained, "qkv from a quantised input": chained,
                     "qkv quantising itself": len(transformers)}, calls
    assert fidelity(backbone_output(model, model.backbone), out)["rel_l2"] <= 0.05

    two = next(t for t in transformers if len(t.transformer_blocks) == 2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, two.in_channels, 8, 8, generator=g)
    context = torch.randn(2, 7, two.transformer_blocks[0].attn2.cross_attention_dim, generator=g)
    with torch.inference_mode():
        handed = two(x, encoder_hidden_states=context).sample
        fused.FP8_QKV_FROM_NORM = False
        try:
            itself = two(x, encoder_hidden_states=context).sample
        finally:
            fused.FP8_QKV_FROM_NORM = True
    assert fidelity(itself, handed)["rel_l2"] <= 5e-3, fidelity(itself, handed)


def test_fused_unet_keeps_channels_last_through_its_transformers():
    """On the fast paths the UNet runs channels-last: each transformer's output must come back in
    that layout (diffusers' own forward returns NCHW, which cost a copy, a strided add and a
    conversion in front of the next convolution), with the same numbers."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    from rtdiff_cluster.ops.fused import install_fused

    model = load_model(ModelConfig(source="synthetic:tiny-sdxl", device="cpu"))
    ours = copy.deepcopy(model.backbone).to(memory_format=torch.channels_last)
    install_fused(ours)
    layouts = []
    for m in ours.modules():
        if isinstance(m, Transformer2DModel):
            m.register_forward_hook(lambda mod, args, out: layouts.append(
                (args[0].shape[-1] > 1 and out[0].is_contiguous(memory_format=torch.channels_last),
                 out[0].is_contiguous())))
    assert_close(backbone_output(model, ours), backbone_output(model, model.backbone), "channels-last UNet")
    assert layouts and all(cl and not nchw for cl, nchw in layouts), layouts


def test_fused_vae_decoder_matches(model):
    from rtdiff_cluster.ops.fused import install_fused

    from diffusers.models.resnet import ResnetBlock2D

    vae = copy.deepcopy(model.vae).to(memory_format=torch.channels_last)
    resnets = sum(isinstance(m, ResnetBlock2D) for m in vae.modules())
    # Every resnet, the KL decoder's up blocks too (built with time_embedding_norm="group", which
    # without a time embedding computes what "default" does).
    assert resnets and install_fused(vae).get("resnet group_norm+silu") == resnets
    z = torch.randn(1, model.vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(1))
    img = torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.inference_mode():
        assert_close(vae.decode(z).sample, model.vae.decode(z).sample, "VAE decoder with fused resnets")
        assert_close(vae.encode(img).latent_dist.mean, model.vae.encode(img).latent_dist.mean,
                     "VAE encoder with fused resnets and downsamplings")


@pytest.mark.parametrize("backends", [["math"], ["sdpa"]])
def test_vae_attention_through_the_registry_matches(model, backends):
    """The KL VAE's mid-block attentions (one 4-D, group-normed, residual head) through our
    processor and the registry, as a CUDA replica serves them, against diffusers' processor."""
    from rtdiff_cluster.ops import processors

    vae = copy.deepcopy(model.vae)
    registry = AttentionRegistry(allowed=backends)
    assert processors.install(vae, registry, fused=False) == 2  # the encoder's and the decoder's
    g = torch.Generator().manual_seed(2)
    z, img = torch.randn(1, model.vae.config.latent_channels, 8, 6, generator=g), torch.rand(1, 3, 48, 40, generator=g)
    with torch.inference_mode():
        assert_close(vae.decode(z).sample, model.vae.decode(z).sample, "VAE decoder, registry attention")
        assert_close(vae.encode(img).latent_dist.mean, model.vae.encode(img).latent_dist.mean,
                     "VAE encoder, registry attention")
    assert set(registry.choices().values()) == set(backends), registry.choices()


def test_fused_tiny_vae_matches_diffusers():
    """The tiny VAE's patched blocks (cuDNN's fused calls on a GPU, diffusers' formula here) and
    upsamplings (our kernel, in the interpreter) against the unpatched decoder and encoder."""
    import diffusers

    from rtdiff_cluster.ops.fused import install_fused

    torch.manual_seed(0)
    vae = diffusers.AutoencoderTiny(latent_channels=4, decoder_block_out_channels=(16, 16, 16, 16),
                                    encoder_block_out_channels=(16, 16, 16, 16)).eval()
    ours = copy.deepcopy(vae).to(memory_format=torch.channels_last)
    done = install_fused(ours)
    # TAESD's shape: 10 blocks in the encoder and 10 in the decoder, 3 upsamplings in the decoder.
    assert done.get("tiny vae block conv+bias+relu") == 20 and done.get("upsample nearest") == 3, done
    g = torch.Generator().manual_seed(1)
    z, img = torch.randn(1, 4, 6, 5, generator=g), torch.rand(1, 3, 48, 40, generator=g) * 2 - 1
    with torch.inference_mode():
        assert_close(ours.decode(z).sample, vae.decode(z).sample, "tiny VAE decoder")
        assert_close(ours.encode(img).latents, vae.encode(img).latents, "tiny VAE encoder")


def test_cpu_replica_keeps_diffusers_modules_and_says_why():
    from rtdiff_cluster.engine import fastpaths

    model = load_model(ModelConfig(device="cpu"))
    before = [type(m.processor).__name__ for m in model.backbone.modules() if hasattr(m, "processor")]
    fp = fastpaths.apply(model, FastPathConfig(quantization="fp8"), world=1)
    assert fp.graphs is None and fp.registry is None and fp.jpeg is None and fp.jpeg_decoder is None
    assert set(fp.report) == {"attention", "kernels", "fp8", "cuda_graphs", "jpeg", "jpeg_decode"}
    assert all(v.startswith("off: CPU replica") for v in fp.report.values())
    assert [type(m.processor).__name__ for m in model.backbone.modules() if hasattr(m, "processor")] == before


@pytest.mark.parametrize("field, value, message", [
    ("attention", "fastest", "models[0].fast_paths.attention: must be one of"),
    ("quantization", "int4", "models[0].fast_paths.quantization: must be none or fp8"),
    ("max_graphs", 0, "models[0].fast_paths.max_graphs"),
    ("graph_memory_mb", 1, "models[0].fast_paths.graph_memory_mb"),
    ("graph_capture_at_call", 3, "models[0].fast_paths.graph_capture_at_call: must be 1 or 2"),
])
def test_fast_path_config_errors_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ServerConfig.from_dict({"models": [{"fast_paths": {field: value}}]})


def test_registry_rejects_mismatched_shapes():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="attention: q"):
        AttentionRegistry(allowed=["math"])(q, torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16))


def test_noise_free_schedulers_are_the_ones_that_add_no_noise():
    import diffusers

    assert _noise_free_step(diffusers.EulerDiscreteScheduler())
    assert _noise_free_step(diffusers.FlowMatchEulerDiscreteScheduler())
    assert not _noise_free_step(diffusers.FlowMatchEulerDiscreteScheduler(stochastic_sampling=True))
    assert not _noise_free_step(diffusers.EulerAncestralDiscreteScheduler())
    assert not _noise_free_step(diffusers.LCMScheduler())


def test_registry_moves_on_when_a_backend_fails_despite_its_guards():
    from rtdiff_cluster.ops.attention import Backend, _math

    def refuse(q, k, v, scale):
        raise RuntimeError("no kernel for these strides")

    calls = []
    backends = [Backend("picky", lambda: None, lambda q, k, v: None, refuse),
                Backend("math", lambda: None, lambda q, k, v: None, lambda *a: calls.append(1) or _math(*a))]
    registry = AttentionRegistry(backends=backends)
    q = torch.randn(1, 2, 5, 8)
    out = registry(q, q, q)
    torch.testing.assert_close(out, torch.softmax(q @ q.transpose(-1, -2) / 8**0.5, -1) @ q)
    registry(q, q, q)
    assert len(calls) == 2 and registry.choices() == {"cpu float32 d8 self": "math"}


def test_sealed_registry_sends_new_shapes_past_a_backend_that_compiles_per_shape():
    """After the warm-up, a shape a per-shape compiling backend (cuDNN) has not built goes to the
    next backend; the shapes it built stay with it, whatever came in between."""
    from rtdiff_cluster.ops.attention import Backend, _math

    ran: list[tuple[str, tuple]] = []

    def recording(name):
        return lambda q, k, v, scale: ran.append((name, tuple(q.shape))) or _math(q, k, v, scale)

    backends = [Backend("compiling", lambda: None, lambda q, k, v: None, recording("compiling"), compiles_per_shape=True),
                Backend("prebuilt", lambda: None, lambda q, k, v: None, recording("prebuilt"))]
    registry = AttentionRegistry(backends=backends)
    warm = torch.randn(1, 2, 6, 8)
    registry(warm, warm, warm)  # the warm-up frame's shape
    registry.seal()
    batch_of_two = torch.randn(2, 2, 6, 8)
    out = registry(batch_of_two, batch_of_two, batch_of_two)
    torch.testing.assert_close(out, _math(batch_of_two, batch_of_two, batch_of_two, None))
    registry(warm, warm, warm)
    cross_q, cross_kv = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 3, 8)
    registry(cross_q, cross_kv, cross_kv)  # a new kind of call after sealing: not built either
    assert ran == [("compiling", (1, 2, 6, 8)), ("prebuilt", (2, 2, 6, 8)), ("compiling", (1, 2, 6, 8)),
                   ("prebuilt", (1, 2, 6, 8))]
    assert registry.choices() == {"cpu float32 d8 self": "compiling (new shapes: prebuilt)",
                                  "cpu float32 d8 cross": "prebuilt"}


def test_unsealed_registry_lets_the_compiling_backend_take_every_shape():
    from rtdiff_cluster.ops.attention import Backend, _math

    names = []
    backends = [Backend("compiling", lambda: None, lambda q, k, v: None,
                        lambda *a: names.append("compiling") or _math(*a), compiles_per_shape=True),
                Backend("prebuilt", lambda: None, lambda q, k, v: None, lambda *a: names.append("prebuilt") or _math(*a))]
    registry = AttentionRegistry(backends=backends)
    for b in (1, 2, 3):
        q = torch.randn(b, 2, 6, 8)
        registry(q, q, q)
    assert names == ["compiling"] * 3
