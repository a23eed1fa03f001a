// A native gRPC client for benchmarks/grpc_front_split.py: `echo_client HOST:PORT N IDLE_MS WARMUP`
// makes WARMUP untimed calls, then N calls, sleeping IDLE_MS before each, and prints one line per
// timed call: "t0 t1" (CLOCK_MONOTONIC nanoseconds before the call and after its reply).
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "echo.grpc.pb.h"

namespace {

long long monotonic_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}

bool call(rtdiff::bench::Echo::Stub& stub, const rtdiff::bench::Blob& request) {
  grpc::ClientContext context;
  rtdiff::bench::Blob reply;
  grpc::Status status = stub.Call(&context, request, &reply);
  if (!status.ok() || reply.data().size() != 64 * 64 * 3) {
    std::fprintf(stderr, "echo_client: %d %s (%zu bytes)\n", status.error_code(),
                 status.error_message().c_str(), reply.data().size());
    return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: echo_client HOST:PORT N IDLE_MS WARMUP\n");
    return 2;
  }
  const int n = std::atoi(argv[2]);
  const double idle_ms = std::atof(argv[3]);
  const int warmup = std::atoi(argv[4]);
  auto stub = rtdiff::bench::Echo::NewStub(grpc::CreateChannel(argv[1], grpc::InsecureChannelCredentials()));
  rtdiff::bench::Blob request;
  request.set_data("x");
  for (int i = 0; i < warmup; ++i)
    if (!call(*stub, request)) return 1;
  std::vector<std::pair<long long, long long>> marks;
  marks.reserve(n);
  for (int i = 0; i < n; ++i) {
    if (idle_ms > 0) std::this_thread::sleep_for(std::chrono::microseconds(static_cast<long long>(idle_ms * 1e3)));
    const long long t0 = monotonic_ns();
    if (!call(*stub, request)) return 1;
    marks.emplace_back(t0, monotonic_ns());
  }
  for (const auto& [t0, t1] : marks) std::printf("%lld %lld\n", t0, t1);
  return 0;
}
