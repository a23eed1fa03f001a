#!/usr/bin/env bash
# Sets up .venv and runs the main job on the embedded default: `rtdiff demo` starts `rtdiff serve`
# (local Ray, synthetic:tiny on CPU), generates and streams frames through the gRPC client into
# ./frames, prints latency percentiles and FPS, and stops the server. Extra flags go to `rtdiff demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/rtdiff demo "$@"
