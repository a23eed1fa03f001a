#!/usr/bin/env bash
# One device call: check the GPU path, then run the hop floor and the gateway-overhead benchmark on CUDA.
# Run from the repo root on the device machine with .whl carried (../shared/tools/device-wheels.sh
# grpcio==1.85.1 protobuf==7.36.2). Results land in $OUT.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, ray, diffusers, transformers, grpc, google.protobuf as p; print('torch', torch.__version__, 'ray', ray.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'grpcio', grpc.__version__, 'protobuf', p.__version__)"
# The GPU test, then the CPU suite's gateway tests with replicas on the GPU (device=auto picks CUDA).
timeout 240 python3 -m pytest -p no:cacheprovider -q -ra tests/test_gpu.py tests/test_generate.py tests/test_stream.py \
  tests/test_admission.py tests/test_replica_failure.py tests/test_link.py 2>&1 | tee "$OUT/gpu_tests.log"
timeout 90 python3 benchmarks/hop_floor.py --n 900 --out "$OUT/hop_floor.json" 2>&1 | grep -v WARNING | tee "$OUT/hop_floor.log"
timeout 330 python3 benchmarks/gateway_overhead.py --device cuda --out-dir "$OUT" --samples 300 --stream-frames 200 \
  --stub-samples 1000 --throughput-seconds 8 2>&1 | tee "$OUT/gateway_overhead.log"
