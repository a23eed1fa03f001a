"""Fused GroupNorm (+ SiLU): the norm -> activation pair of every SDXL UNet resnet in two kernels.

diffusers' ResnetBlock2D runs norm1 -> SiLU -> conv1 and norm2 -> SiLU -> conv2. Eagerly GroupNorm
reads x twice (statistics, then normalise) and writes y, and SiLU reads y and writes it again: five
passes over the tensor. PyTorch's CUDA GroupNorm also reduces each (n, group) in one thread block,
which at N = 2 and 32 groups is 64 blocks on a 132-SM H200.

Here:
  1. `_gn_stats_kernel`: grid (channel blocks, hw chunks, N). Each program reads one tile column
     of x (a block of whole groups - or a slice of one wide group - over a chunk of H*W) and
     writes per-(n, group, slice, chunk) partial statistics (mean, M2) in fp32. Inside the loop
     every tile lane runs its own Welford update (no cross-warp reduction per tile); lanes are
     then merged into channels, channels into groups, and later chunks into the group total, all
     with Chan's formula on centred values, so a large mean does not cancel the variance away
     (E[x^2] - E[x]^2 in fp32 would).
  2. `_gn_apply_kernel`: same grid. Each program merges the few partials of its groups into mean
     and rstd, folds weight/bias into one per-channel scale and shift, and writes
     silu(x * scale + shift) in x's dtype and memory format.

  3. Large problems only (from _LARGE_ELEMS elements per sample, e.g. a KL VAE decoder's
     activations): `_gn_merge_kernel` merges each group's partials once, into (mean, rstd), and
     the apply programs read those. Their grid has more chunks than an apply program could merge
     in registers (partials per group = chunks).

Tried and dropped (benchmarks/NOTES.md, 2026-11-25): small groups in one kernel, one program per
(n, group) reading its group three times. At batch 1 that is 32 programs, each moving about
10 GB/s: 68 us a call at 1024 and 33 at 512, against 18 and 11 us on average for the two kernels here.

Bytes moved: x read twice + y written once = 3 * numel * itemsize, the floor for a two-pass norm
whose tensor does not fit on chip. SDXL's activations at 1024x1024 (128x128 latents) are 21-63 MB
in bf16, around H200's 50 MB L2, so part of the second read can come from L2: the apply kernel
walks the chunks in reverse order to meet the most recently read ones first. Partials are a few
KB. Eager GroupNorm (statistics pass + normalise pass) followed by SiLU moves ~5 * numel *
itemsize.

An optional per-(sample, channel) offset t, added to x before the norm, is folded in: it moves
each channel's mean (the stats kernel adds it to the channel means before merging them into
groups; the spread within a channel does not change) and enters the apply kernel's per-channel
shift. This is a UNet resnet's time-embedding add (hidden + temb[:, :, None, None] in front of
norm2), which eagerly is one more broadcast pass over the tensor.

Layouts: contiguous (NCHW) and channels_last are both handled through strides (element (n, c, hw)
at n*sN + c*sC + hw*sHW); the tile's fast axis follows whichever of c and hw has unit stride so
loads stay coalesced. The output has x's memory format.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from rtdiff_kernels._checks import check_eps, check_vector
from rtdiff_kernels._launch import sm_count, triton_runs

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Tuning knobs (module level so the tests can shrink them to reach multi-chunk / split-group paths
# at tiny sizes). Chosen on an SDXL step's own 46 calls (benchmarks/tune_group_norm.py, now tune_pointwise.py, H200,
# results/tune_group_norm-2026-11-24-*): 4 warps and 2 programs per SM took them from 1163 to
# 907 us at 1024 and from 748 to 584 us at 512 against the earlier 8 warps and 4 per SM. Most of
# those calls are 32x32 and 64x64 latents, where more, smaller programs only add each program's
# fixed cost (its reductions and partials); larger tiles (8192, 16384) were slower at every setting.
_TILE_ELEMS = 4096
_NUM_WARPS = 4
_PROGRAMS_PER_SM = 2  # grid target: programs per SM over channel blocks x H*W chunks
_MAX_BLOCK_C_CL = 256  # channels_last: wide rows of contiguous channels per tile
_MAX_BLOCK_C_NCHW = 128  # NCHW: rows are H*W-contiguous, a narrower channel block suffices
_MAX_GROUPS_PER_BLOCK = 32  # bounds the [BLOCK_C, BLOCK_G] one-hot that maps channels to groups
_MAX_PARTIALS = 2048  # BLOCK_G * slices * chunks: the partials each apply program merges
# Large problems (a KL VAE decoder's activations at 1024: 128-512 channels of 256^2-1024^2): at
# the knobs above a [1, 128, 1024, 1024] call got 64 programs (the partials cap: 32 groups per
# block leaves 64 chunks), one per two SMs. From _LARGE_ELEMS elements per sample the grid is
# sized by the knobs below and the partials are merged once per group by a third kernel
# (_gn_merge_kernel), not by every apply program. SDXL's UNet at 1024 stays below (its largest
# GroupNorm input is 960 x 128 x 128 = 15.7 M).
_LARGE_ELEMS = 1 << 24
_LARGE_TILE_ELEMS = 4096
# Swept on a KL VAE decode's 30 calls at 1024 (benchmarks/tune_pointwise.py --model vae, H200,
# results/tune_pointwise-2026-11-25-*-gn-large.md): 8 warps at 4 per SM took 3.95 ms, the first
# guess (4 warps, 8 per SM) 4.30, larger tiles 4.35-7.67.
_LARGE_NUM_WARPS = 8
_LARGE_PROGRAMS_PER_SM = 4


@triton.jit
def _tile(offs_hw, offs_c, C_FASTEST: tl.constexpr):
    """Broadcastable (hw, c) index pair of a tile whose last (fast) axis is the unit-stride one:
    [BLOCK_HW, BLOCK_C] for channels_last, [BLOCK_C, BLOCK_HW] for NCHW."""
    if C_FASTEST:
        return offs_hw[:, None], offs_c[None, :]
    else:
        return offs_hw[None, :], offs_c[:, None]


@triton.jit
def _per_channel(v, C_FASTEST: tl.constexpr):
    """A [BLOCK_C] vector broadcast along the hw axis of a tile."""
    if C_FASTEST:
        return v[None, :]
    else:
        return v[:, None]


@triton.jit
def _channel_block(cb, G, CG, SUB_C, GPB: tl.constexpr, SUBS: tl.constexpr, C_ALIGN: tl.constexpr):
    """(first group, slice, first channel, channel count) of channel block cb: GPB whole groups
    (SUBS == 1) or slice `sub` of one group (GPB == 1)."""
    g0 = (cb // SUBS) * GPB
    sub = cb % SUBS
    c0 = g0 * CG + sub * SUB_C
    n_ch = tl.minimum(tl.minimum(GPB, G - g0) * CG - sub * SUB_C, GPB * SUB_C)
    if C_ALIGN > 1:
        # The wrapper checked that every block starts and ends on a multiple of C_ALIGN channels, so
        # rounding changes nothing; it shows the compiler that alignment, letting channels_last tiles
        # load and store 16-byte vectors under the channel mask (tl.multiple_of hints on these
        # scalars did not survive canonicalisation).
        c0 = c0 // C_ALIGN * C_ALIGN
        n_ch = n_ch // C_ALIGN * C_ALIGN
    return g0, sub, c0, n_ch


# The sizes' divisibility is not specialised on (each new value class would compile a variant when
# a new resolution arrives); loads vectorise along the channel strides, which keep theirs.
@triton.jit(do_not_specialize=["HW", "K", "HW_PER_CHUNK"])
def _gn_stats_kernel(
    x_ptr, t_ptr, part_ptr,  # x: [N, C, HW] by strides; t: [N, C] offsets; part: [N, G, SUBS, K, 2] fp32 (mean, M2)
    HW, G, CG, SUB_C, K, HW_PER_CHUNK,
    s_n, s_c, s_hw, st_n, st_c,
    GPB: tl.constexpr, SUBS: tl.constexpr, C_ALIGN: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_G: tl.constexpr,
    C_FASTEST: tl.constexpr, HAS_T: tl.constexpr,
):
    cb = tl.program_id(0)
    k = tl.program_id(1)
    n = tl.program_id(2)
    g0, sub, c0, n_ch = _channel_block(cb, G, CG, SUB_C, GPB, SUBS, C_ALIGN)
    offs_c = tl.arange(0, BLOCK_C)
    hw_start = k * HW_PER_CHUNK
    hw_end = tl.minimum(hw_start + HW_PER_CHUNK, HW)
    base = x_ptr + n.to(tl.int64) * s_n + c0.to(tl.int64) * s_c

    # Welford per tile lane: no cross-warp reduction inside the loop, so loads stay in flight.
    # Lanes of the last, partial tile that fall past hw_end keep their state.
    if C_FASTEST:
        mean = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
    else:
        mean = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    m2 = mean
    for hw0 in range(hw_start, hw_end, BLOCK_HW):
        hw_i, c_i = _tile(hw0 + tl.arange(0, BLOCK_HW), offs_c, C_FASTEST)
        mask = (hw_i < hw_end) & (c_i < n_ch)
        x = tl.load(base + hw_i.to(tl.int64) * s_hw + c_i * s_c, mask=mask, other=0.0).to(tl.float32)
        inv_cnt = 1.0 / ((hw0 - hw_start) // BLOCK_HW + 1).to(tl.float32)
        delta = x - mean
        new_mean = mean + delta * inv_cnt
        m2 = tl.where(mask, m2 + delta * (x - new_mean), m2)
        mean = tl.where(mask, new_mean, mean)

    # Lanes -> channels (Chan's merge; a lane's count is the number of tiles that reached it),
    # then channels -> groups (equal counts: the group mean is the average of channel means and M2
    # adds their spread around it).
    n_hw = hw_end - hw_start
    n_iter = (n_hw + BLOCK_HW - 1) // BLOCK_HW
    rem = n_hw - (n_iter - 1) * BLOCK_HW
    lane_cnt = ((n_iter - 1) + (tl.arange(0, BLOCK_HW) < rem).to(tl.int32)).to(tl.float32)
    lane_cnt, _ = _tile(lane_cnt, offs_c, C_FASTEST)
    n_hw_f = n_hw.to(tl.float32)
    if C_FASTEST:
        ch_mean = tl.sum(lane_cnt * mean, axis=0) / n_hw_f
        dev = mean - ch_mean[None, :]
        ch_m2 = tl.sum(m2 + lane_cnt * dev * dev, axis=0)
    else:
        ch_mean = tl.sum(lane_cnt * mean, axis=1) / n_hw_f
        dev = mean - ch_mean[:, None]
        ch_m2 = tl.sum(m2 + lane_cnt * dev * dev, axis=1)
    if HAS_T:  # x + t: every value of the channel moves by t, its spread stays
        ch_mean += tl.load(t_ptr + n * st_n + (c0 + offs_c) * st_c, mask=offs_c < n_ch, other=0.0).to(tl.float32)

    ch_per_group = tl.minimum(SUB_C, n_ch).to(tl.float32)
    offs_g = tl.arange(0, BLOCK_G)
    onehot = ((offs_c // SUB_C)[:, None] == offs_g[None, :]) & (offs_c < n_ch)[:, None]  # [BLOCK_C, BLOCK_G]
    g_mean = tl.sum(tl.where(onehot, ch_mean[:, None], 0.0), axis=0) / ch_per_group
    spread = tl.where(onehot, ch_mean[:, None] - g_mean[None, :], 0.0)
    g_m2 = tl.sum(tl.where(onehot, ch_m2[:, None], 0.0), axis=0) + tl.sum(spread * spread, axis=0) * n_hw_f

    g_ok = offs_g < tl.minimum(GPB, G - g0)
    slot = ((n * G + g0 + offs_g).to(tl.int64) * SUBS + sub) * K + k
    tl.store(part_ptr + slot * 2, g_mean, mask=g_ok)
    tl.store(part_ptr + slot * 2 + 1, g_m2, mask=g_ok)


@triton.jit(do_not_specialize=["HW", "K", "HW_PER_CHUNK"])
def _gn_merge_kernel(part_ptr, stat_ptr, HW, CG, SUB_C, K, HW_PER_CHUNK, eps,
                     SUBS: tl.constexpr, BLOCK_P: tl.constexpr):
    """Large problems: one program per (n, group) merges its SUBS * K partials (Chan's formula,
    weights = element counts) into (mean, rstd) at stat_ptr[(n * G + g) * 2 + {0, 1}]."""
    ng = tl.program_id(0)
    offs_p = tl.arange(0, BLOCK_P)  # p = slice * K + chunk
    p_ok = offs_p < SUBS * K
    slot = ng.to(tl.int64) * (SUBS * K) + offs_p
    p_mean = tl.load(part_ptr + slot * 2, mask=p_ok, other=0.0)
    p_m2 = tl.load(part_ptr + slot * 2 + 1, mask=p_ok, other=0.0)
    p_cnt = tl.minimum(SUB_C, CG - (offs_p // K) * SUB_C).to(tl.float32) * \
        tl.minimum(HW_PER_CHUNK, HW - (offs_p % K) * HW_PER_CHUNK).to(tl.float32)
    p_cnt = tl.where(p_ok, p_cnt, 0.0)
    total = tl.sum(p_cnt, axis=0)
    mean = tl.sum(p_cnt * p_mean, axis=0) / total
    dev = tl.where(p_ok, p_mean - mean, 0.0)
    var = (tl.sum(p_m2, axis=0) + tl.sum(p_cnt * dev * dev, axis=0)) / total
    tl.store(stat_ptr + ng * 2, mean)
    tl.store(stat_ptr + ng * 2 + 1, 1.0 / tl.sqrt(var + eps))


@triton.jit(do_not_specialize=["HW", "K", "HW_PER_CHUNK"])
def _gn_apply_kernel(
    x_ptr, t_ptr, y_ptr, w_ptr, b_ptr, part_ptr,
    HW, G, CG, SUB_C, K, HW_PER_CHUNK, eps,
    sx_n, sx_c, sx_hw, st_n, st_c, sy_n, sy_c, sy_hw,
    GPB: tl.constexpr, SUBS: tl.constexpr, C_ALIGN: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
    C_FASTEST: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, HAS_T: tl.constexpr,
    MERGED: tl.constexpr,
):
    """MERGED: part_ptr holds each group's (mean, rstd) from _gn_merge_kernel; otherwise the
    stats kernel's partials, which each program merges for its groups."""
    cb = tl.program_id(0)
    # Walk (n, chunk) in the reverse of the stats kernel's launch order: what it read last is the
    # likeliest to still be in L2.
    k = K - 1 - tl.program_id(1)
    n = tl.num_programs(2) - 1 - tl.program_id(2)
    g0, sub, c0, n_ch = _channel_block(cb, G, CG, SUB_C, GPB, SUBS, C_ALIGN)
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < n_ch

    offs_g = tl.arange(0, BLOCK_G)
    g_ok = offs_g < tl.minimum(GPB, G - g0)
    if MERGED:
        stat = (n * G + g0 + offs_g).to(tl.int64) * 2
        g_mean = tl.load(part_ptr + stat, mask=g_ok, other=0.0)
        g_rstd = tl.load(part_ptr + stat + 1, mask=g_ok, other=0.0)
    else:
        # Merge each group's SUBS * K partials (Chan's formula, weights = element counts).
        offs_p = tl.arange(0, BLOCK_P)  # p = slice * K + chunk
        p_ok = offs_p < SUBS * K
        gp_ok = g_ok[:, None] & p_ok[None, :]
        slot = (n * G + g0 + offs_g).to(tl.int64)[:, None] * (SUBS * K) + offs_p[None, :]
        p_mean = tl.load(part_ptr + slot * 2, mask=gp_ok, other=0.0)
        p_m2 = tl.load(part_ptr + slot * 2 + 1, mask=gp_ok, other=0.0)
        p_sub = offs_p // K
        p_chunk = offs_p % K
        p_cnt = tl.minimum(SUB_C, CG - p_sub * SUB_C).to(tl.float32) * \
            tl.minimum(HW_PER_CHUNK, HW - p_chunk * HW_PER_CHUNK).to(tl.float32)
        p_cnt = tl.where(p_ok, p_cnt, 0.0)[None, :]
        total = tl.sum(p_cnt, axis=1)  # = CG * HW, the group's element count
        g_mean = tl.sum(p_cnt * p_mean, axis=1) / total
        dev = tl.where(gp_ok, p_mean - g_mean[:, None], 0.0)
        g_var = (tl.sum(p_m2, axis=1) + tl.sum(p_cnt * dev * dev, axis=1)) / total
        g_rstd = 1.0 / tl.sqrt(g_var + eps)

    # Groups -> channels, then weight/bias folded into one scale and shift per channel.
    onehot = (offs_c // SUB_C)[:, None] == offs_g[None, :]
    c_mean = tl.sum(tl.where(onehot, g_mean[None, :], 0.0), axis=1)
    scale = tl.sum(tl.where(onehot, g_rstd[None, :], 0.0), axis=1)
    if HAS_W:
        scale *= tl.load(w_ptr + c0 + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    shift = -c_mean * scale
    if HAS_B:
        shift += tl.load(b_ptr + c0 + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    if HAS_T:  # (x + t) * scale + shift
        shift += tl.load(t_ptr + n * st_n + (c0 + offs_c) * st_c, mask=c_ok, other=0.0).to(tl.float32) * scale
    scale = _per_channel(scale, C_FASTEST)
    shift = _per_channel(shift, C_FASTEST)

    hw_start = k * HW_PER_CHUNK
    hw_end = tl.minimum(hw_start + HW_PER_CHUNK, HW)
    x_base = x_ptr + n.to(tl.int64) * sx_n + c0.to(tl.int64) * sx_c
    y_base = y_ptr + n.to(tl.int64) * sy_n + c0.to(tl.int64) * sy_c
    for hw0 in range(hw_start, hw_end, BLOCK_HW):
        hw_i, c_i = _tile(hw0 + tl.arange(0, BLOCK_HW), offs_c, C_FASTEST)
        mask = (hw_i < hw_end) & (c_i < n_ch)
        hw_i = hw_i.to(tl.int64)
        x = tl.load(x_base + hw_i * sx_hw + c_i * sx_c, mask=mask, other=0.0).to(tl.float32)
        y = x * scale + shift
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_base + hw_i * sy_hw + c_i * sy_c, y.to(y_ptr.dtype.element_ty), mask=mask)


def _channel_blocking(groups: int, cg: int, c_fastest: bool) -> tuple[int, int, int, int]:
    """(groups per block, slices per group, channels per slice, BLOCK_C).

    Narrow groups are packed several to a block, choosing the count that wastes the fewest padded
    lanes over all blocks (C = 1280, 40 per group: 3 groups = 120 of 128 lanes); channels_last
    blocks are at least 64 channels wide, and a multiple of 8 where possible, so each tile row is
    a long contiguous run of 16-byte vectors. A group wider than the cap (e.g. GroupNorm(1, C)) is
    cut into slices whose partials are merged like chunks.
    """
    hi = _MAX_BLOCK_C_CL if c_fastest else _MAX_BLOCK_C_NCHW
    if cg > hi:
        subs = triton.cdiv(cg, hi)
        sub_c = triton.cdiv(cg, subs)
        if cg % 8 == 0:  # keep slices on 8-channel boundaries (vector loads, see _channel_align)
            sub_c = triton.cdiv(sub_c, 8) * 8
            subs = triton.cdiv(cg, sub_c)
        return 1, subs, sub_c, triton.next_power_of_2(sub_c)
    lo = min(64, groups * cg) if c_fastest else 1
    best = None
    for gpb in range(1, min(groups, _MAX_GROUPS_PER_BLOCK) + 1):
        ch = gpb * cg
        if ch > hi:
            break
        if ch < lo:
            continue
        lanes = triton.cdiv(groups, gpb) * triton.next_power_of_2(ch)
        # Prefer blocks of a multiple of 8 channels (16-byte vectors in channels_last); then the
        # fewest lanes; ties go to the wider block.
        key = (ch % 8 != 0 and c_fastest, lanes)
        if best is None or key <= best[0]:
            best = (key, gpb)
    gpb = best[1] if best is not None else min(groups, _MAX_GROUPS_PER_BLOCK, max(1, hi // cg))
    return gpb, 1, cg, triton.next_power_of_2(gpb * cg)


def _channel_align(c: int, cg: int, gpb: int, subs: int, sub_c: int) -> int:
    """8 when every channel block starts and ends on a multiple of 8 channels, else 1."""
    if subs == 1:
        ok = c % 8 == 0 and (gpb * cg) % 8 == 0
    else:
        ok = cg % 8 == 0 and sub_c % 8 == 0
    return 8 if ok else 1


def _hw_view(t: torch.Tensor) -> torch.Tensor | None:
    """[N, C, H, W] -> [N, C, H*W] without a copy, or None when H and W cannot be merged."""
    if t.dim() == 3:
        return t
    try:
        return t.view(t.shape[0], t.shape[1], -1)
    except RuntimeError:
        return None


def _knobs() -> tuple:
    return (_TILE_ELEMS, _NUM_WARPS, _PROGRAMS_PER_SM, _MAX_BLOCK_C_CL, _MAX_BLOCK_C_NCHW, _MAX_GROUPS_PER_BLOCK,
            _MAX_PARTIALS, _LARGE_ELEMS, _LARGE_TILE_ELEMS, _LARGE_NUM_WARPS, _LARGE_PROGRAMS_PER_SM)


@functools.lru_cache(maxsize=1024)
def _plan(n: int, c: int, hw: int, groups: int, c_fastest: bool, sms: int, knobs: tuple):
    """Launch geometry for one problem shape (cached: the per-call Python cost matters next to a
    few-microsecond kernel). `knobs` is only part of the cache key."""
    cg = c // groups
    large = c * hw >= _LARGE_ELEMS
    tile_elems, num_warps, per_sm = ((_LARGE_TILE_ELEMS, _LARGE_NUM_WARPS, _LARGE_PROGRAMS_PER_SM) if large
                                     else (_TILE_ELEMS, _NUM_WARPS, _PROGRAMS_PER_SM))
    gpb, subs, sub_c, block_c = _channel_blocking(groups, cg, c_fastest)
    block_hw = max(1, min(tile_elems // block_c, triton.next_power_of_2(hw)))
    block_g = triton.next_power_of_2(gpb)
    n_cblocks = triton.cdiv(groups, gpb) * subs
    # Split H*W into chunks until the grid holds a few programs per SM (N * 32 groups alone would
    # leave most of the GPU idle), each chunk a whole number of tiles.
    n_tiles = triton.cdiv(hw, block_hw)
    # Planned for one sample whatever the batch: BLOCK_P (a constexpr) follows the chunk count, and
    # a plan that moved with N compiled new kernel variants for every new batch size on the
    # serving path (19 for an SDXL batch of two at 1024, 9 s on an H200 host,
    # benchmarks/results/new_bucket-2026-11-24-*). A larger batch just has more programs.
    want_chunks = triton.cdiv(per_sm * sms, n_cblocks)
    merged = large and want_chunks * block_g * subs > _MAX_PARTIALS
    if not merged:
        want_chunks = max(1, min(want_chunks, _MAX_PARTIALS // (block_g * subs)))
    tiles_per_chunk = triton.cdiv(n_tiles, want_chunks)
    hw_per_chunk = tiles_per_chunk * block_hw
    chunks = triton.cdiv(hw, hw_per_chunk)
    # Sized for the most chunks this channel layout can have (chunks <= want_chunks), not for this
    # H*W: a resolution with fewer chunks reuses the variant (masked partials), where sizing it to
    # the chunks compiled one per resolution (10 for a 512 chunk-cache region of an SDXL stream).
    block_p = triton.next_power_of_2(subs * want_chunks)
    meta = dict(GPB=gpb, SUBS=subs, C_ALIGN=_channel_align(c, cg, gpb, subs, sub_c), BLOCK_C=block_c,
                BLOCK_HW=block_hw, BLOCK_G=block_g, C_FASTEST=c_fastest, num_warps=num_warps)
    return (n_cblocks, chunks, n), sub_c, chunks, hw_per_chunk, block_p, merged, meta


def _check_offset(offset, x) -> None:
    if offset is None:
        return
    n, c = x.shape[:2]
    if not isinstance(offset, torch.Tensor) or offset.dim() != 2 or offset.shape[1] != c or offset.shape[0] not in (1, n):
        raise ValueError(f"channel_offset must be [N, C] or [1, C] = [{n}, {c}] or [1, {c}] for x of shape "
                         f"{tuple(x.shape)}, got {tuple(getattr(offset, 'shape', ())) or type(offset).__name__}")
    if not offset.is_floating_point() or offset.device != x.device:
        raise ValueError(f"channel_offset must be a float tensor on {x.device}, got {offset.dtype} on {offset.device}")


def _check(x, num_groups, weight, bias, eps):
    if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4):
        raise ValueError(f"x must be a 3-D [N, C, L] or 4-D [N, C, H, W] tensor, got {getattr(x, 'shape', type(x))}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    c = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if c % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the channel count C={c} of x")
    check_vector("weight", weight, c, x)
    check_vector("bias", bias, c, x)
    check_eps(eps)


def group_norm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    eps: float, silu: bool = True, channel_offset: torch.Tensor | None = None) -> torch.Tensor:
    """silu(group_norm(x + channel_offset)) (or without the SiLU when silu=False), statistics in fp32.

    x: [N, C, H, W] (contiguous or channels_last) or [N, C, L], fp32/fp16/bf16.
    weight, bias: [C] of any float dtype, or None. channel_offset: [N, C] or [1, C] (one row for
    every sample), added to every position of its (sample, channel) in fp32, or None.
    Returns x's shape, dtype and memory format.
    Off CUDA (and outside Triton's interpreter) this runs the PyTorch reference.
    """
    _check(x, num_groups, weight, bias, eps)
    _check_offset(channel_offset, x)
    if not triton_runs(x):
        return group_norm_silu_reference(x, num_groups, weight, bias, eps, silu, channel_offset)
    y = torch.empty_like(x)  # keeps x's memory format (contiguous or channels_last)
    if x.numel() == 0:
        return y
    x3, y3 = _hw_view(x), _hw_view(y)
    if x3 is None or y3 is None:  # an exotic stride pattern: normalise it to contiguous
        x = x.contiguous()
        y = torch.empty_like(x)
        x3, y3 = _hw_view(x), _hw_view(y)
    n, c, hw = x3.shape
    c_fastest = c > 1 and x3.stride(1) < x3.stride(2)  # channels_last (or [N, L, C] transposed)
    sms = sm_count(x)
    grid, sub_c, chunks, hw_per_chunk, block_p, merged, meta = _plan(n, c, hw, num_groups, c_fastest, sms, _knobs())
    groups, cg, subs = num_groups, c // num_groups, meta["SUBS"]

    t = channel_offset if channel_offset is not None else x3
    st_n = 0 if channel_offset is None or t.shape[0] == 1 else t.stride(0)  # one row: every sample reads it
    st_c = t.stride(1) if channel_offset is not None else 0
    has_t = channel_offset is not None
    part = torch.empty((n, groups, subs, chunks, 2), device=x.device, dtype=torch.float32)
    _gn_stats_kernel[grid](x3, t, part, hw, groups, cg, sub_c, chunks, hw_per_chunk,
                           x3.stride(0), x3.stride(1), x3.stride(2), st_n, st_c, HAS_T=has_t, **meta)
    if merged:
        stat = torch.empty((n, groups, 2), device=x.device, dtype=torch.float32)
        _gn_merge_kernel[(n * groups,)](part, stat, hw, cg, sub_c, chunks, hw_per_chunk, float(eps),
                                        SUBS=subs, BLOCK_P=block_p, num_warps=4)
        part, block_p = stat, 1
    w = weight.contiguous() if weight is not None else x3
    b = bias.contiguous() if bias is not None else x3
    _gn_apply_kernel[grid](x3, t, y3, w, b, part, hw, groups, cg, sub_c, chunks, hw_per_chunk, float(eps),
                           x3.stride(0), x3.stride(1), x3.stride(2), st_n, st_c, y3.stride(0), y3.stride(1), y3.stride(2),
                           BLOCK_P=block_p, HAS_W=weight is not None, HAS_B=bias is not None, SILU=bool(silu),
                           HAS_T=has_t, MERGED=merged, **meta)
    return y


def group_norm_silu_reference(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                              bias: torch.Tensor | None, eps: float, silu: bool = True,
                              channel_offset: torch.Tensor | None = None) -> torch.Tensor:
    """x + offset, F.group_norm, then F.silu, in x's dtype (weight/bias/offset cast to it, as a
    module in that dtype has)."""
    if channel_offset is not None:
        x = x + channel_offset.to(x.dtype).reshape(*channel_offset.shape, *([1] * (x.dim() - 2)))
    w = weight.to(x.dtype) if weight is not None else None
    b = bias.to(x.dtype) if bias is not None else None
    y = F.group_norm(x, num_groups, w, b, eps)
    return F.silu(y) if silu else y
