#!/usr/bin/env bash
# One device call: the parts named on the command line, in order (default: all).
#   gpu-tests  tests/test_gpu.py (CUDA replica, NVML series; sharded serving where there are 2 GPUs)
#   fast-path-tests  tests/test_gpu_fast_paths.py alone (fast paths, graphs, attention sealing, batch splits)
#   norm-tests  tests/test_kernels_norms.py alone, at full sizes on the GPU
#   vae-tests  the GPU tests of the VAEs as served (tiny and KL: tolerance policy, graph replay), of the
#              attention backend for head dims over 256 and of the bias-add kernel
#   hop        benchmarks/hop_floor.py           gateway  benchmarks/gateway_overhead.py --device cuda
#   sharding   benchmarks/sharding.py (SDXL and Flux-dev at 1024, every layout the GPUs allow, flux-80b)
#   kernel-tests  the kernel, fast-path and FP8 tests at full sizes on the GPU
#   kernel-bench  the kernels' micro-benchmarks (kernels/bench_*.py)
#   attention-bench  kernels/bench_attention.py alone, then tests/test_kernels_attention.py on the GPU
#   roofline-sdxl / roofline-vae / roofline-flux   benchmarks/roofline.py, one part per call's budget
#   stream-cache  benchmarks/stream_cache.py (SDXL 1024, tiny VAE: the chunk cache's speed and fidelity)
#   stream-cache-flux  the same for Flux-dev at 1024, with the static tokens' recorded K/V as a setting
#   knobs         benchmarks/knobs.py (SDXL 1024, tiny VAE: samplers x steps, fp8, adaptive steps vs the exact pipeline)
#   stream-serving  benchmarks/stream_serving.py (live 1024 streams through the gateway: 1-step fps/p99, governor)
#   region-batch  benchmarks/region_batch.py (k chunk-cache regions of one shape in one launch against one by one;
#                 env REGION_BATCH_ARGS: more options, e.g. "--lanes 2")
#   region-batch-tests  the GPU tests of region batches and chunk-cache launches
#   region-batch-ab  stream_serving.py's 1-step JPEG cases (chunk cache at windows 2-5, cache off at 2 and 4) with
#                 stream_cache.region_batch 4, then 1 (env RB_RUNS: the values, in order; RB_CASES, RB_ARGS and
#                 RB_TAG: other cases, stream_serving.py options and a file-name suffix)
#   serving-runs  stream_serving.py once per line of env SERVING_RUNS, each "TAG ARGS..." (a fresh
#                 server each; e.g. "hold --cases '1-step, chunk cache, JPEG' --stream-cache hold_regions=true"),
#                 after the GPU tests of held regions and region batches (env SKIP_TESTS: the runs alone)
#   power         benchmarks/power_clocks.py (bf16, then FP8): power, SM clock and clock-event reasons under a sustained 1024 step
#   attention-tune  kernels/tune_attention.py (our attention kernel's configs and inner-loop options at SDXL's batch-1
#                 1024 shapes, against cuDNN)
#   gemm-calls    benchmarks/gemm_calls.py (each cuBLAS GEMM of the graphed 1024 step with its shape and the kernel
#                 before it, against the same shape alone: hot, cold weights, cold weights and inputs)
#   pdl-bench     kernels/bench_pdl.py (a kernel boundary in a CUDA graph with and without programmatic dependent launch)
#   image-codec   benchmarks/image_codec.py (a frame's JPEG encode and decode: PIL on the host, nvJPEG on the GPU)
#   unet-profile  benchmarks/unet_profile.py (an SDXL step's kernels one by one at 1024, 512 and 384)
#   frame-profile  benchmarks/unet_profile.py --frame 1 (a whole 1-step frame's kernels against its wall time)
#   attention-ab  the step profile A/B at 1024 and 512, twice each: attention with Triton for small calls, or cuDNN first;
#                 then the attention registry's GPU tests
#   attention-tests  tests/test_kernels_attention.py on the GPU (autotunes every head dim: minutes)
#   frame-attention-ab  the 1-step frame profile at 1024 and 512, alternating twice: Triton for small attention calls or not
#   frame-ab      the frame profile A/B, twice each: each batch's scheduler a copy of one built once, or built from its config
#   frame8-kv-ab  the 8-step frame at 1024, alternating twice: cross-attention K/V once per captured loop or every step
#   gn-tune       benchmarks/tune_pointwise.py --kernels group_norm_silu (its launch knobs on an SDXL step's own calls)
#   gn-large-tune  benchmarks/tune_pointwise.py --kernels group_norm_silu_large --model vae (GroupNorm's large-problem
#                 knobs on an SDXL KL VAE decode's own calls at 1024)
#   pointwise-tune  benchmarks/tune_pointwise.py: geglu's and add_layer_norm's launch knobs on an SDXL step's own calls
#   linear-bench  kernels/bench_linear.py (our Triton linear and linear+GEGLU against cuBLAS at an SDXL step's linears),
#                 then tests/test_kernels_linear.py on the GPU
#   jpeg-stream   the GPU tests of JPEG input frames decoded on the replica (tests/test_gpu.py -k jpeg), then
#                 stream_serving.py's 1-step cases, raw and JPEG input frames
#   aside-tests   the GPU fast-path tests of captures aside, batch splits, launched and chunk-cached frames
#   aside-ab      stream_serving.py's chunk-cache and governed cases with graph_capture_aside on, then off
#   jpeg-ab       stream_serving.py's chunk-cache cases (raw and JPEG input frames, windows 2 and 3), twice, each run
#                 a fresh server, into $OUT/jpeg-ab-N
#   pointwise-check  the step profile at 1024 and 512 (geglu's kernel now takes a row tile), then the GPU tests of
#                 geglu and add_layer_norm at full size
#   cudnn-once    the step profile at 1024 and 512 with cuDNN's heuristic convolution engines, then in benchmark mode
#   capture-race  a capture beside a thread that syncs, copies and allocates, thread-local (shipped) then global mode
#   fold-ab       the step profile A/B at 1024 and 512, twice each: attention's scale folded into exp2's argument
#                 (shipped) or multiplied first (before)
#   temb-ab       the GPU fast-path tests, then the step profile A/B at 1024 and 512, twice each: the resnets'
#                 time-embedding projections as one matmul (shipped) or each its own (--per-resnet-temb, before)
#   gn-ab         the step profile A/B at 1024 and 512, twice each: GroupNorm's shipped launch knobs, or 4096,8,4 (before)
#   new-bucket-ab new_bucket.py alternating twice: a bucket captured at its first call (the default), or eager at its
#                 first and captured at its second (--eager-first)
#   launch-overlap-ab  benchmarks/launch_overlap.py, alternating twice: launches without blocking copies, or with them
#                 (as before); then tests/test_gpu_fast_paths.py (a launch checked under PyTorch's sync debug mode)
#   new-bucket    benchmarks/new_bucket.py (what a shape bucket the replica has not seen costs its first frame)
#   new-bucket-cudnn  the same with cuDNN attention building kernels for new shapes too
#   scaling-1024 / scaling-video / scaling-serving   issue 7's run, one part per call: synthetic:flux-40b
#                 (80 GB in bf16) with true CFG at tp=1,2,4,8 and tp=4 x cfg-parallel 2 (those the GPUs allow),
#                 at 1024 and at 16,384 image tokens, tp against tp; then a tp=<all GPUs> replica through the
#                 gateway with 4-step sampling
#   fa4-stage     keep .fa4a (the first half of the CUTLASS DSL's compiler library, carried alone) in .fa4keep for
#                 the next call; the fa4-* parts below run in a call that carries .fa4b (see the install below)
#   fa4-bench     kernels/bench_attention.py with FlashAttention 4 installed, then the attention registry's GPU tests
#   fa4-tests     the attention registry's and the flash-attn backends' GPU tests alone
#   fa4-ab        the step profile A/B at 1024 and 512, twice each: FlashAttention 4 in the registry or left out
#   fa4-fast-path-tests  tests/test_gpu_fast_paths.py with FlashAttention 4 installed
#   grpc-idle     benchmarks/grpc_idle_wake.py (a bare gRPC call after an idle wait, by the server's and client's CPU placement)
#   fp8-fidelity  rtdiff serve with synthetic:sdxl in FP8 (and the tiny VAE), until its start-up log reports the FP8
#                 fidelity the replica measured at warm-up; then SIGTERM
#   grpc-split    benchmarks/grpc_front_split.py (a bare call split at the handler, Python and native gRPC server and
#                 client; carry .grpcnative, built by benchmarks/grpc_front/build.sh)
#   geglu-gemm    kernels/bench_linear.py (pointer and persistent-TMA tiles against cuBLAS), tests/test_kernels_linear.py
#                 on the GPU, then, if the fused GEGLU GEMM beat cuBLAS + geglu at the 1024 step's 1280-wide
#                 feed-forward, the step profile at 1024 and 512 alternating twice: without it (cuBLAS + geglu), then
#                 with it at that shape's fastest configuration (kernels/linear.py's knobs)
#   geglu-ab      the step profile A/B at 1024 and 512, twice each: GEGLU feed-forwards through the fused TMA GEMM
#                 where it is faster (shipped) or cuBLAS + geglu everywhere (before); then the GPU fast-path tests
#                 and tests/test_kernels_linear.py
#   library-gemm  kernels/bench_library_gemm.py (quack-kernels' CuTe-DSL GEMM, carried with FA4, against cuBLAS at the
#                 1024 step's linears; GEGLU in its epilogue against cuBLAS + our geglu)
#   flux-blocks   the GPU tests of the gated-residual kernels, QK-norm + rotary into a joint tensor's rows and Flux's
#                 fused blocks and fast paths; then benchmarks/dit_profile.py at 1024 alternating twice: Flux blocks
#                 through ops/flux_blocks.py (shipped) or diffusers' own forwards (--unfused-blocks, before; env
#                 FLUX_AB_ARGS: more options for both arms, e.g. --fp8); with env FLUX_BENCH set, then kernels/bench_norms.py
#   gelu-fp8-ab   the GPU tests of gelu_tanh_fp8; then dit_profile.py --fp8 at 1024 alternating twice: its row held in
#                 registers (shipped) or walked twice (--knob activations._GELU_FP8_ONE_PASS_LANES=0, before); then
#                 kernels/bench_fp8.py
#   e4m3-ab       the FP8 GPU tests; then dit_profile.py --fp8 (Flux-dev) and unet_profile.py --fp8 (SDXL) at 1024
#                 alternating twice: e4m3 rounding by the hardware cast (shipped) or in integer arithmetic
#                 (RTDIFF_E4M3_SOFTWARE_ROUNDING=1, before); then kernels/bench_fp8.py both ways. The profiles
#                 travel as one tar (e4m3-ab.tar.gz), since a call brings back only a few files
#   qkv-norm-ab   the FP8 GPU tests; then unet_profile.py --fp8 at 1024 alternating twice: norm1 hands the chained
#                 blocks' fused q/k/v its output quantised (shipped) or the projection quantises it
#                 (--knob rtdiff_cluster.ops.fused.FP8_QKV_FROM_NORM=0, before); the JSONs as one tar
#   qkv-ab        dit_profile.py at 1024, bf16 then --fp8, each alternating twice: Flux's attention with q/k/v fused per
#                 stream (shipped) or three linears (--unfused-qkv, before); the profiles travel as one tar (qkv-ab.tar.gz)
# Run from the repo root on the device machine with .whl carried (benchmarks/device_wheels.sh fills it, under
# what one call may carry). Results land in $OUT.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
# .whl: the packages the device lacks (benchmarks/device_wheels.sh). A call that carries .fa4b instead (the
# fa4-* parts) brings its own subset, since both together are over what one call may carry.
mkdir -p /tmp/site && export PYTHONPATH=/tmp/site:$PWD
for dir in .whl .fa4b; do ls $dir/*.whl >/dev/null 2>&1 || continue
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $dir/*.whl || exit 1
done
# FlashAttention 4 (flash-attn-4 and the CUTLASS DSL it compiles with; benchmarks/fa4_wheels.sh makes .fa4a and
# .fa4b) for the attention registry. The DSL's
# compiler library is 92 MB as a wheel, over one call's 64 MiB, so it travels as an xz tar in two halves: part
# fa4-stage keeps the first (.fa4a) in .fa4keep, which the device machine keeps while warm, and the next call
# carries the second (.fa4b) with the other wheels. Unpacked after pip, whose --upgrade would replace the
# nvidia_cutlass_dsl/ directory the tar fills. The DSL's packages sit where its .pth would put them.
# A warm machine also keeps /tmp/site, so a serving run with FA4 (which needs Ray too) can be three calls in a
# row: any part with .whl carried (installs Ray and the rest), fa4-stage with .fa4a, then the run with .fa4b.
if ls .fa4keep/cutlass-*.part-* .fa4b/cutlass-*.part-* >/dev/null 2>&1; then
  cat .fa4keep/cutlass-*.part-* .fa4b/cutlass-*.part-* | xz -dc | tar x -C /tmp/site || exit 1
  export PYTHONPATH=$PYTHONPATH:/tmp/site/nvidia_cutlass_dsl/dsl_packages
  export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1  # its kernels compiled once per machine, not per process
  python3 -c "import flash_attn.cute as f; print('flash-attn 4 imports:', f.__file__)" 2>&1 | tail -3
fi
ln -sfn "$PWD/kernels" /tmp/site/rtdiff_kernels  # kernels/ is imported as rtdiff_kernels (setup.py maps it when installed)
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, diffusers, transformers, grpc, google.protobuf as p; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'grpcio', grpc.__version__, 'protobuf', p.__version__, 'gpus', torch.cuda.device_count())"
# unet_profile_ab PREFIX FLAG ARGS...: unet_profile.py ARGS four times, alternating without and with FLAG, each
# into $OUT/PREFIX-N (with FLAG: PREFIX-old-N); prints its per-size lines. The markdown is made again from the JSON.
unet_profile_ab() {
  local prefix=$1 flag=$2 n=0 ab dir; shift 2
  for ab in "" "$flag" "" "$flag"; do dir="$OUT/$prefix${ab:+-old}-$((++n))"; mkdir -p "$dir"
    timeout 150 python3 benchmarks/unet_profile.py "$@" $ab --out-dir "$dir" 2>&1 | grep -E "^(1024|512): "
    rm -f "$dir"/*.md; done
}
parts=${*:-gpu-tests hop gateway sharding}
for part in $parts; do
  echo "=== $part"
  case $part in
    gpu-tests) timeout 300 python3 -m pytest -p no:cacheprovider -q -ra tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" ;;
    fast-path-tests) timeout 400 python3 -m pytest -p no:cacheprovider -q -ra tests/test_gpu_fast_paths.py 2>&1 \
      | tail -40 | tee "$OUT/fast_path_tests.log" ;;
    vae-tests) timeout 300 python3 -m pytest -p no:cacheprovider -q -ra tests/test_gpu_fast_paths.py \
      tests/test_kernels_attention.py tests/test_kernels_pointwise.py -k "vae or blocked_matmul or add_bias" 2>&1 \
      | tail -15 | tee "$OUT/vae_tests.log" ;;
    norm-tests) timeout 300 python3 -m pytest -p no:cacheprovider -q -ra tests/test_kernels_norms.py 2>&1 \
      | tail -30 | tee "$OUT/norm_tests.log" ;;
    region-batch) timeout 400 python3 benchmarks/region_batch.py --device cuda --out-dir "$OUT" ${REGION_BATCH_ARGS:-} 2>&1 \
      | grep -v WARNING | tee "$OUT/region_batch.log" ;;
    region-batch-tests) timeout 300 python3 -m pytest -p no:cacheprovider -q -ra tests/test_gpu_fast_paths.py \
        -k "region or launched_back_to_back or chunk" 2>&1 | tail -30 | tee "$OUT/region_batch_tests.log" ;;
    region-batch-ab) for rb in ${RB_RUNS:-4 1}; do timeout 330 python3 benchmarks/stream_serving.py --device cuda --frames 240 --skip-engine-alone \
        --cases "${RB_CASES:-1-step, cache off, JPEG;1-step, chunk cache, JPEG}" --region-batch $rb ${RB_ARGS:-} \
        --tag region-batch-$rb${RB_TAG:-} \
        --out-dir "$OUT" 2>&1 | grep -E "^\| 1-step|Error|error" ; done ;;
    serving-runs) [ -n "${SKIP_TESTS:-}" ] || timeout 240 python3 -m pytest -p no:cacheprovider -q -ra tests/test_gpu.py \
        tests/test_gpu_fast_paths.py -k "holds_regions or region or launched_back_to_back or chunk" 2>&1 | tail -15 \
        | tee "$OUT/hold_tests.log"
      mapfile -t runs <<< "${SERVING_RUNS:?set SERVING_RUNS}"
      for run in "${runs[@]}"; do [ -n "$run" ] && eval "set -- $run" || continue; tag=$1; shift
        echo "--- $tag: $*"
        timeout 300 python3 benchmarks/stream_serving.py --device cuda --frames 240 --skip-engine-alone --tag "$tag" \
          --out-dir "$OUT" "$@" 2>&1 | grep -E "^\| 1-step|Error|error|Traceback" ; done ;;
    power) for f in "" --fp8; do timeout 150 python3 benchmarks/power_clocks.py --size 1024 $f --out-dir "$OUT" 2>&1 \
        | grep -v Warning | tail -12; done ;;
    attention-tune) timeout 560 python3 kernels/tune_attention.py --out "$OUT/tune_attention.json" 2>&1 \
        | grep -v Warning | tee "$OUT/tune_attention.log" ;;
    gemm-calls) timeout 300 python3 benchmarks/gemm_calls.py --out-dir "$OUT" 2>&1 | tee "$OUT/gemm_calls.log" ;;
    pdl-bench) timeout 120 python3 kernels/bench_pdl.py --out "$OUT/bench_pdl.json" 2>&1 | tee "$OUT/bench_pdl.log" ;;
    image-codec) timeout 200 python3 benchmarks/image_codec.py --out-dir "$OUT" 2>&1 | tee "$OUT/image_codec.log" ;;
    hop) timeout 90 python3 benchmarks/hop_floor.py --n 900 --out "$OUT/hop_floor.json" 2>&1 | grep -v WARNING | tee "$OUT/hop_floor.log" ;;
    gateway) timeout 420 python3 benchmarks/gateway_overhead.py --device cuda --out-dir "$OUT" --samples 300 --stream-frames 200 \
      --stub-samples 1000 --stub-compute-ms 0,20 --throughput-seconds 8 2>&1 | tee "$OUT/gateway_overhead.log" ;;
    sharding) timeout 580 python3 benchmarks/sharding.py --models sdxl,flux-dev --size 1024 --steps 10 --warmup 3 \
      --oversized flux-80b --out-dir "$OUT" 2>&1 | tee "$OUT/sharding.log" ;;
    kernel-tests) timeout 540 python3 -m pytest -p no:cacheprovider -q -ra --durations=15 tests/test_gpu_fast_paths.py \
      tests/test_fast_paths.py tests/test_kernels_*.py tests/test_fp8.py 2>&1 | tail -80 | tee "$OUT/kernel_tests.log" ;;
    flux-blocks) timeout 240 python3 -m pytest -p no:cacheprovider -q -ra tests/test_kernels_norms.py \
        tests/test_kernels_pointwise.py tests/test_gpu_fast_paths.py tests/test_fp8.py \
        -k "gated or gelu_tanh or rms_norm_rope or flux" 2>&1 \
        | tail -15 | tee "$OUT/flux_block_tests.log"
      n=0; for ab in "" --unfused-blocks "" --unfused-blocks; do n=$((n + 1))
        timeout 200 python3 benchmarks/dit_profile.py --sizes 1024 $ab ${FLUX_AB_ARGS:-} --tag "ab$n" --out-dir "$OUT" \
          2>&1 | grep -E "^1024: |Error|error"; done
      [ -z "${FLUX_BENCH:-}" ] || timeout 200 python3 kernels/bench_norms.py --out "$OUT/bench_norms.json" 2>&1 \
        | grep -vi warning | tail -30 | tee "$OUT/bench_norms.log" ;;
    gelu-fp8-ab) timeout 200 python3 -m pytest -p no:cacheprovider -q -ra tests/test_fp8.py -k gelu_tanh 2>&1 \
        | tail -15 | tee "$OUT/gelu_fp8_tests.log"
      n=0; for ab in "" "--knob activations._GELU_FP8_ONE_PASS_LANES=0" "" "--knob activations._GELU_FP8_ONE_PASS_LANES=0"
      do n=$((n + 1))
        timeout 200 python3 benchmarks/dit_profile.py --sizes 1024 --fp8 $ab --tag "gelu-ab$n" --out-dir "$OUT" \
          2>&1 | grep -E "^1024: |Error|error"; done
      timeout 200 python3 kernels/bench_fp8.py --out "$OUT/bench_fp8.json" 2>&1 | grep -vi warning | tail -40 \
        | tee "$OUT/bench_fp8.log" ;;
    e4m3-ab) timeout 300 python3 -m pytest -p no:cacheprovider -q -ra tests/test_fp8.py tests/test_gpu_fast_paths.py \
        -k "fp8 or flux" 2>&1 | tail -15 | tee "$OUT/e4m3_tests.log"
      n=0; for sw in "" 1 "" 1; do n=$((n + 1)); d="$OUT/e4m3-ab/${sw:+software-}$n"; mkdir -p "$d"
        RTDIFF_E4M3_SOFTWARE_ROUNDING=$sw timeout 200 python3 benchmarks/dit_profile.py --sizes 1024 --fp8 \
          --out-dir "$d" 2>&1 | grep -E "^1024: |Error|error" | sed "s/^/flux ${sw:+software }/"
        RTDIFF_E4M3_SOFTWARE_ROUNDING=$sw timeout 150 python3 benchmarks/unet_profile.py --sizes 1024 --fp8 \
          --out-dir "$d" 2>&1 | grep -E "^1024: |Error|error" | sed "s/^/sdxl ${sw:+software }/"; done \
        | tee "$OUT/e4m3_ab.log"
      tar czf "$OUT/e4m3-ab.tar.gz" -C "$OUT" e4m3-ab && rm -rf "$OUT/e4m3-ab"
      for sw in "" 1; do RTDIFF_E4M3_SOFTWARE_ROUNDING=$sw timeout 200 python3 kernels/bench_fp8.py \
          --out "$OUT/bench_fp8${sw:+-software}.json" 2>&1 | grep -A9 "fused producer" \
          | tee "$OUT/bench_fp8${sw:+-software}.log"; done ;;
    qkv-ab) for fp8 in "" --fp8; do n=0; for ab in "" --unfused-qkv "" --unfused-qkv; do n=$((n + 1))
        timeout 200 python3 benchmarks/dit_profile.py --sizes 1024 $fp8 $ab --tag "qkv-ab$n" --out-dir "$OUT/qkv-ab" \
          2>&1 | grep -E "^1024: |Error|error" | sed "s/^/${fp8:+fp8 }${ab:-fused} /"; done; done | tee "$OUT/qkv_ab.log"
      tar czf "$OUT/qkv-ab.tar.gz" -C "$OUT" qkv-ab && rm -rf "$OUT/qkv-ab" ;;
    qkv-norm-ab) timeout 300 python3 -m pytest -p no:cacheprovider -q -ra tests/test_fp8.py tests/test_gpu_fast_paths.py \
        -k "fp8 or sdxl" 2>&1 | tail -15 | tee "$OUT/qkv_norm_tests.log"
      unet_profile_ab qkv-norm-ab/step "--knob rtdiff_cluster.ops.fused.FP8_QKV_FROM_NORM=0" --sizes 1024 --fp8 \
        | tee "$OUT/qkv_norm_ab.log"
      tar czf "$OUT/qkv-norm-ab.tar.gz" -C "$OUT" qkv-norm-ab && rm -rf "$OUT/qkv-norm-ab" ;;
    kernel-bench) for b in kernels/bench_*.py; do n=$(basename "$b" .py)
      timeout 90 python3 "$b" --out "$OUT/$n.json" 2>&1 | tee "$OUT/$n.log"; done ;;
    attention-bench) timeout 240 python3 kernels/bench_attention.py --out "$OUT/bench_attention.json" 2>&1 \
      | tee "$OUT/bench_attention.log" ;;
    attention-tests) timeout 400 python3 -m pytest -p no:cacheprovider -q -ra tests/test_kernels_attention.py 2>&1 \
      | tail -15 | tee "$OUT/attention_tests.log" ;;
    frame-attention-ab) unet_profile_ab fab --no-small-triton --frame 1 --sizes 1024,512 ;;
    attention-ab) unet_profile_ab ab --no-small-triton --sizes 1024,512
      timeout 120 python3 -m pytest -p no:cacheprovider -q -ra tests/test_kernels_attention.py -k "registry or small" 2>&1 \
      | tail -8 | tee "$OUT/attention_registry_tests.log" ;;
    roofline-*) timeout 580 python3 benchmarks/roofline.py --parts "${part#roofline-}" --tag "${part#roofline-}" \
      --out-dir "$OUT" 2>&1 | tee "$OUT/$part.log" ;;
    stream-cache) timeout 580 python3 benchmarks/stream_cache.py --device cuda --frames 12 --out-dir "$OUT" 2>&1 \
      | tee "$OUT/stream_cache.log" ;;
    stream-cache-flux) timeout 580 python3 benchmarks/stream_cache.py --device cuda --source synthetic:flux-dev \
      --frames 8 --out-dir "$OUT" 2>&1 | tee "$OUT/stream_cache_flux.log" ;;
    knobs) timeout 540 python3 benchmarks/knobs.py --device cuda --runs 5 --out-dir "$OUT" 2>&1 | tee "$OUT/knobs.log" ;;
    stream-serving) timeout 580 python3 benchmarks/stream_serving.py --device cuda --frames 240 --out-dir "$OUT" 2>&1 \
      | grep -v WARNING | tee "$OUT/stream_serving.log" ;;
    unet-profile) timeout 300 python3 benchmarks/unet_profile.py --sizes 1024,512,384 --out-dir "$OUT" 2>&1 \
      | grep -v "^USDT" | tee "$OUT/unet_profile.log" ;;
    frame-profile) timeout 300 python3 benchmarks/unet_profile.py --frame 1 --sizes 1024,512 --out-dir "$OUT" 2>&1 \
      | grep -v "^USDT" | tee "$OUT/frame_profile.log" ;;
    frame-ab) unet_profile_ab ab --scheduler-from-config --frame 1 --sizes 1024,512 ;;
    frame8-kv-ab) unet_profile_ab kv8 --kv-per-step --frame 8 --sizes 1024 ;;
    gn-tune) timeout 330 python3 benchmarks/tune_pointwise.py --kernels group_norm_silu --sizes 1024,512 --budget-s 240 \
      --tag gn --out-dir "$OUT" 2>&1 | grep -v WARNING | tee "$OUT/tune_group_norm.log" ;;
    gn-large-tune) timeout 330 python3 benchmarks/tune_pointwise.py --kernels group_norm_silu_large --model vae \
      --sizes 1024 --budget-s 200 --out-dir "$OUT" 2>&1 | grep -v WARNING | tee "$OUT/tune_gn_large.log" ;;
    pointwise-tune) timeout 420 python3 benchmarks/tune_pointwise.py --kernels geglu,add_layer_norm --sizes 1024,512 \
      --budget-s 150 --out-dir "$OUT" 2>&1 | grep -v WARNING | tee "$OUT/tune_pointwise.log" ;;
    linear-bench) timeout 300 python3 kernels/bench_linear.py --out "$OUT/bench_linear.json" 2>&1 | tee "$OUT/bench_linear.log"
      timeout 200 python3 -m pytest -p no:cacheprovider -q -ra tests/test_kernels_linear.py 2>&1 | tail -5 \
        | tee "$OUT/linear_tests.log" ;;
    jpeg-stream) timeout 200 python3 -m pytest -p no:cacheprovider -q -ra tests/test_gpu.py -k jpeg 2>&1 | tail -30 \
        | tee "$OUT/jpeg_tests.log"
      timeout 380 python3 benchmarks/stream_serving.py --device cuda --frames 240 --cases "1-step" --out-dir "$OUT" 2>&1 \
        | grep -v WARNING | tee "$OUT/stream_serving.log" ;;
    jpeg-ab) for n in 1 2; do mkdir -p "$OUT/jpeg-ab-$n"
      timeout 280 python3 benchmarks/stream_serving.py --device cuda --frames 240 --cases "1-step, chunk cache" \
        --out-dir "$OUT/jpeg-ab-$n" 2>&1 | grep -E "^\| 1-step|^Engine"; done ;;
    pointwise-check) mkdir -p "$OUT/pointwise-profile"
      timeout 200 python3 benchmarks/unet_profile.py --sizes 1024,512 --out-dir "$OUT/pointwise-profile" 2>&1 \
        | grep -E "^(1024|512): "
      timeout 240 python3 -m pytest -p no:cacheprovider -q -ra tests/test_kernels_pointwise.py tests/test_kernels_norms.py \
        -k "geglu or add_layer_norm" 2>&1 | tail -5 | tee "$OUT/pointwise_tests.log" ;;
    cudnn-once) for ab in "" --cudnn-benchmark; do dir="$OUT/cudnn${ab:+-bench}"; mkdir -p "$dir"
      timeout 200 python3 benchmarks/unet_profile.py $ab --sizes 1024,512 --out-dir "$dir" 2>&1 | grep -E "^(1024|512): "
      done ;;
    aside-tests) timeout 300 python3 -m pytest -p no:cacheprovider -q -ra tests/test_gpu_fast_paths.py \
      -k "aside or batch_size or launched_back_to_back or capture or chunk" 2>&1 | tail -30 | tee "$OUT/aside_tests.log" ;;
    aside-ab) for ab in ${ASIDE_RUNS:-on off}; do
      timeout 290 python3 benchmarks/stream_serving.py --device cuda --frames 240 --skip-engine-alone --capture-aside $ab \
        --tag "aside-$ab" --cases "1-step, chunk cache;4 steps, governed" --out-dir "$OUT" 2>&1 | grep -v WARNING \
        | tee "$OUT/aside-$ab.log"; done ;;
    capture-race) timeout 120 python3 - <<'PY' 2>&1 | grep -v Warning | tee "$OUT/capture_race.log"
import sys
sys.path.insert(0, "tests")
from test_gpu_fast_paths import capture_beside_a_busy_thread
for mode in ("thread_local", "global"):
    try:
        errors, loops, captures = capture_beside_a_busy_thread(mode)
        print(f"{mode}: errors in the other thread {len(errors)} {[f'{type(e).__name__}: {str(e)[:90]}' for e in errors[:1]]}, "
              f"its loops {loops}, captures {captures}", flush=True)
    except Exception as e:
        print(f"{mode}: the capturing thread raised {type(e).__name__}: {str(e)[:160]}", flush=True)
PY
      ;;
    temb-ab) timeout 200 python3 -m pytest -p no:cacheprovider -q -ra tests/test_gpu_fast_paths.py 2>&1 | tail -15 \
        | tee "$OUT/fast_path_tests.log"
      unet_profile_ab temb "--per-resnet-temb" --sizes 1024,512 ;;
    fold-ab) unet_profile_ab fold "--knob attention.FOLD_SCALE=0" --sizes 1024,512 ;;
    gn-ab) unet_profile_ab gn "--knob group_norm_silu._TILE_ELEMS=4096 --knob group_norm_silu._NUM_WARPS=8
      --knob group_norm_silu._PROGRAMS_PER_SM=4" --sizes 1024,512 ;;
    new-bucket-ab) n=0; for ab in "" --eager-first "" --eager-first; do d="$OUT/nb${ab:+-eager}-$((++n))"
      mkdir -p "$d"; timeout 140 python3 benchmarks/new_bucket.py --device cuda $ab --out-dir "$d" 2>&1 \
      | grep -E "^\{'bucket'"; done ;;
    launch-overlap-ab) n=0; for ab in "" --blocking-copies "" --blocking-copies; do d="$OUT/lo${ab:+-old}-$((++n))"
      mkdir -p "$d"; timeout 150 python3 benchmarks/launch_overlap.py $ab --out-dir "$d" 2>&1 | grep -E "(text|image)-to-image"
      rm -f "$d"/*.md; done
      timeout 300 python3 -m pytest -p no:cacheprovider -q -ra tests/test_gpu_fast_paths.py 2>&1 | tail -30 \
      | tee "$OUT/fast_path_tests.log" ;;
    new-bucket) timeout 240 python3 benchmarks/new_bucket.py --device cuda --out-dir "$OUT" 2>&1 | grep -v WARNING \
      | tee "$OUT/new_bucket.log" ;;
    new-bucket-cudnn) timeout 240 python3 benchmarks/new_bucket.py --device cuda --compile-attention-for-new-shapes \
      --out-dir "$OUT" 2>&1 | grep -v WARNING | tee "$OUT/new_bucket_cudnn.log" ;;
    scaling-1024) timeout 590 python3 benchmarks/sharding.py --models flux-40b --tps 1,2,4,8 --dit-cfg --size 1024 \
      --steps 5 --warmup 2 --no-fp32-reference --timeout 240 --out-dir "$OUT" 2>&1 | tee "$OUT/scaling_1024.log" ;;
    scaling-video) timeout 590 python3 benchmarks/sharding.py --models flux-40b --tps 2,4,8 --dit-cfg --tokens 16384 \
      --steps 3 --warmup 1 --no-fp32-reference --timeout 240 --out-dir "$OUT" 2>&1 | tee "$OUT/scaling_video.log" ;;
    scaling-serving) timeout 590 python3 benchmarks/stream_serving.py --device cuda --source synthetic:flux-40b \
      --tp "$(python3 -c 'import torch; print(torch.cuda.device_count())')" --cases "4 steps, ungoverned" \
      --frames 60 --out-dir "$OUT" 2>&1 | grep -v WARNING | tee "$OUT/scaling_serving.log" ;;
    fa4-stage) mkdir -p .fa4keep && cp .fa4a/* .fa4keep/ && ls -l .fa4keep ;;
    fa4-bench) timeout 300 python3 kernels/bench_attention.py --out "$OUT/bench_attention.json" 2>&1 | grep -v Warning \
        | tee "$OUT/bench_attention.log"
      timeout 300 python3 -m pytest -p no:cacheprovider -q -ra tests/test_kernels_attention.py -k "flash_attn or registry" 2>&1 | tail -15 \
        | tee "$OUT/attention_tests.log" ;;
    fa4-tests) timeout 200 python3 -m pytest -p no:cacheprovider -q -ra tests/test_kernels_attention.py \
        -k "flash_attn or registry" 2>&1 | tail -8 | tee "$OUT/attention_tests.log" ;;
    geglu-gemm) timeout 200 python3 kernels/bench_linear.py --out "$OUT/bench_linear.json" 2>"$OUT/bench_linear.err" \
        | tee "$OUT/bench_linear.log"; tail -3 "$OUT/bench_linear.err"
      timeout 150 python3 -m pytest -p no:cacheprovider -q -ra tests/test_kernels_linear.py 2>&1 | tail -5 \
        | tee "$OUT/linear_tests.log"
      knobs=$(python3 -c '
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
r = next(r for r in rows if r["size"] == 1024 and r["geglu"] and r["k"] == 1280)
if r.get("ours_us", 1e9) < r["cublas_us"]:
    names = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "WARPS", "STAGES", "GROUP_M", "TMA", "PERSISTENT")
    print(" ".join(["--knob linear._FUSED_GEGLU=1"] + [f"--knob linear._GEGLU_{k}={int(v)}" for k, v in zip(names, r["best_config"])]))
' "$OUT/bench_linear.json" 2>/dev/null)
      echo "fused GEGLU knobs: ${knobs:-none (it did not beat cuBLAS + geglu)}"
      if [ -n "$knobs" ]; then n=0; for arm in off on off on; do dir="$OUT/geglu-$arm-$((++n))"; mkdir -p "$dir"
        timeout 120 python3 benchmarks/unet_profile.py --sizes 1024,512 \
          $([ $arm = on ] && echo $knobs || echo --knob linear._FUSED_GEGLU=0) --out-dir "$dir" \
          2>&1 | grep -E "^(1024|512): "; rm -f "$dir"/*.md; done; fi ;;
    geglu-ab) unet_profile_ab geglu-gemm "--knob linear._FUSED_GEGLU=0" --sizes 1024,512
      timeout 300 python3 -m pytest -p no:cacheprovider -q -ra tests/test_gpu_fast_paths.py 2>&1 | tail -30 \
        | tee "$OUT/fast_path_tests.log"
      timeout 120 python3 -m pytest -p no:cacheprovider -q -ra tests/test_kernels_linear.py 2>&1 | tail -5 \
        | tee "$OUT/linear_tests.log" ;;
    fa4-ab) unet_profile_ab fa4 "--no-backend flash-attn-4" --sizes 1024,512 ;;
    grpc-idle) timeout 300 python3 benchmarks/grpc_idle_wake.py --n 300 --out "$OUT/grpc_idle_wake.json" 2>&1 \
        | tee "$OUT/grpc_idle_wake.log" ;;
    fp8-fidelity)
      printf '[[models]]\nsource = "synthetic:sdxl"\ndevice = "cuda"\nvae = "tiny"\n[models.fast_paths]\nquantization = "fp8"\n' \
        > /tmp/fp8.toml
      python3 -m rtdiff_cluster.cli serve --config /tmp/fp8.toml --port 0 --metrics-port 0 > "$OUT/fp8_fidelity.log" 2>&1 &
      pid=$!
      for _ in $(seq 400); do grep -q -E "ready after|Traceback" "$OUT/fp8_fidelity.log" && break; sleep 1; done
      kill -TERM $pid; wait $pid
      grep -E "fast path fp8|FP8 fidelity|warmed up|ready after|Error" "$OUT/fp8_fidelity.log" ;;
    grpc-split) timeout 500 python3 benchmarks/grpc_front_split.py --n 300 --out "$OUT/grpc_front_split.json" 2>&1 \
        | tee "$OUT/grpc_front_split.log" ;;
    library-gemm) timeout 400 python3 kernels/bench_library_gemm.py --out "$OUT/bench_library_gemm.json" 2>&1 \
        | grep -v Warning | tee "$OUT/bench_library_gemm.log" ;;
    fa4-fast-path-tests) timeout 300 python3 -m pytest -p no:cacheprovider -q -ra tests/test_gpu_fast_paths.py 2>&1 \
        | tail -15 | tee "$OUT/fast_path_tests.log" ;;
    *) echo "unknown part $part" ;;
  esac
done
