#!/usr/bin/env bash
# Fill .fa4a and .fa4b with FlashAttention 4 and what it needs, for the device machine's Python 3.12 on
# x86-64, in the two pieces benchmarks/device_run.sh's fa4-* parts carry (one call may carry 64 MiB in all).
#
#   bash benchmarks/fa4_wheels.sh        # a few minutes: xz of the DSL's 237 MB compiler library
#
# .fa4a: the first 34 MiB of an xz tar of nvidia-cutlass-dsl-libs-cu13 (its wheel is 92 MB, over a call's
#        limit; the tar is about 61 MiB). Carried alone by `device_run.sh fa4-stage`, which keeps it on the
#        warm device machine.
# .fa4b: the rest of that tar, flash-attn-4 and its other needs, and the wheels the fa4-* parts need besides
#        FA4 (diffusers, grpcio, protobuf: taken from .whl, which benchmarks/device_wheels.sh fills).
#        Carried by the call that runs the parts, right after fa4-stage.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
FA4=${FA4:-flash-attn-4==4.0.0b36}
DSL=${DSL:-4.8.1}
ls .whl/diffusers-*.whl .whl/grpcio-1*.whl .whl/protobuf-*.whl >/dev/null  # device_wheels.sh first
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform any -d "$1" "${@:2}"
}
download "$tmp/libs" "nvidia-cutlass-dsl-libs-cu13==$DSL"
download "$tmp/rest" "$FA4" "nvidia-cutlass-dsl==$DSL" "nvidia-cutlass-dsl-libs-base==$DSL" \
  "nvidia-cutlass-dsl-libs-core==$DSL" apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5
mkdir -p "$tmp/tree" && (cd "$tmp/tree" && python3 -m zipfile -e "$tmp"/libs/*.whl .)
tar -C "$tmp/tree" -cf - . | xz -9e -T0 > "$tmp/cutlass-cu13.tar.xz"
rm -rf .fa4a .fa4b && mkdir -p .fa4a .fa4b
split -b 34M -d -a 1 "$tmp/cutlass-cu13.tar.xz" "$tmp/cutlass-cu13.tar.xz.part-"
mv "$tmp/cutlass-cu13.tar.xz.part-0" .fa4a/ && mv "$tmp"/cutlass-cu13.tar.xz.part-* .fa4b/
cp "$tmp"/rest/*.whl .fa4b/
cp .whl/diffusers-*.whl .whl/importlib_metadata-*.whl .whl/grpcio-1*.whl .whl/protobuf-*.whl .fa4b/
du -sh .fa4a .fa4b
