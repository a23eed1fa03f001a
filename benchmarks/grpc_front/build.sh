#!/usr/bin/env bash
# Builds the native echo server and client of benchmarks/grpc_front_split.py into .grpcnative/
# (ignored), with the gRPC C++ libraries they link beside them, so the folder can be carried to the
# device machine (which has no gRPC C++) and run there with LD_LIBRARY_PATH=.grpcnative/lib.
# Needs Debian's libgrpc++-dev, protobuf-compiler-grpc and g++ (apt-get install -y libgrpc++-dev
# protobuf-compiler-grpc). The C library, libstdc++ and libgcc_s are the device's own.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
src=$root/benchmarks/grpc_front
out=$root/.grpcnative
rm -rf "$out" && mkdir -p "$out/gen" "$out/lib"
protoc -I "$src" --cpp_out="$out/gen" --grpc_out="$out/gen" --plugin=protoc-gen-grpc="$(command -v grpc_cpp_plugin)" "$src/echo.proto"
flags="-O2 -std=c++17 -I$out/gen $(pkg-config --cflags grpc++ protobuf)"
libs="$(pkg-config --libs grpc++ protobuf)"
for prog in echo_server echo_client; do
  g++ $flags -o "$out/$prog" "$src/$prog.cc" "$out/gen/echo.pb.cc" "$out/gen/echo.grpc.pb.cc" $libs -Wl,--disable-new-dtags,-rpath,'$ORIGIN/lib'
done
ldd "$out/echo_server" "$out/echo_client" | awk '/=> \//{print $3}' | sort -u \
  | grep -v -E '/(libc|libm|libstdc\+\+|libgcc_s)\.so' | while read -r lib; do cp -L "$lib" "$out/lib/"; done
rm -rf "$out/gen"
pkg-config --modversion grpc++ > "$out/VERSION"
echo "built $out: $(du -sh "$out" | cut -f1), grpc++ $(pkg-config --modversion grpc++)"
