#!/usr/bin/env bash
# Fills .whl for device calls: ../shared/tools/device-wheels.sh with the grpcio and protobuf our
# generated stubs need, then Ray's wheel without the libraries built on Ray that we never import
# (RLlib, Data, Serve, Tune, Train, LLM; about 4.7 MB).
#
# Why: a device call carries at most 64 MiB, the tracked tree included. The tree (about 8 MiB, most
# of it benchmarks/results) plus the full set (58 MiB) went over it, and calls had to leave a wheel
# behind. Ray's core (raylet, GCS, dashboard agent, _private) is kept whole: `ray.init` starts them.
#
#   bash benchmarks/device_wheels.sh      # then carry [".whl"]
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
mkdir -p .git/info
bash ../shared/tools/device-wheels.sh grpcio==1.85.1 protobuf==7.36.2 >/dev/null
python3 - <<'PY'
import glob, os, zipfile

unused = tuple(f"ray/{lib}/" for lib in ("rllib", "data", "serve", "tune", "train", "llm"))
for src in glob.glob(".whl/ray-*.whl"):
    with zipfile.ZipFile(src) as zin:
        if not any(n.startswith(unused) for n in zin.namelist()):
            continue
        tmp = src + ".tmp"
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
            for info in zin.infolist():
                if info.filename.startswith(unused):
                    continue
                data = zin.read(info)
                if info.filename.endswith(".dist-info/RECORD"):  # pip checks nothing against it, but keep it true
                    lines = data.decode().splitlines()
                    data = ("\n".join(l for l in lines if not l.startswith(unused)) + "\n").encode()
                zout.writestr(info, data)
    os.replace(tmp, src)
PY
tree=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
echo "tracked tree $((tree >> 20)) MiB + .whl $((wheels >> 20)) MiB = $(((tree + wheels) >> 20)) MiB of the 64 a call may carry"
