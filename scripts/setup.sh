#!/usr/bin/env bash
# Creates .venv (once) and installs rtdiff-cluster with its test extras into it. Idempotent.
#   PYTHON=python3.12 bash scripts/setup.sh      # choose the interpreter (3.11+)
#   TORCH_SPEC="torch==2.13.0" (default)         # choose the torch build pip installs first
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
pip_install() { .venv/bin/python -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored" || true; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC"
  pip_install "$TORCH_SPEC"
fi
if ! .venv/bin/python -c "import rtdiff_cluster, rtdiff_kernels, ray, diffusers, grpc_tools, pytest, triton" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.rtdiff-installed ] || [ setup.py -nt .venv/.rtdiff-installed ]; then
  echo "setup: installing rtdiff-cluster and its dependencies"
  pip_install -e ".[test]"
  touch .venv/.rtdiff-installed
fi
.venv/bin/python -c "import rtdiff_cluster, torch, ray" || { echo "setup: installation failed" >&2; exit 1; }
# The deployment tests' tools: helm (+ schema validators) under .tools/, Prometheus and promtool from apt.
bash scripts/tools/install-helm.sh || { echo "setup: installing helm failed" >&2; exit 1; }
bash scripts/tools/install-prometheus.sh || { echo "setup: installing prometheus failed" >&2; exit 1; }
