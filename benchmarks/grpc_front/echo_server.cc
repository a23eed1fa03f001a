// A native gRPC server answering Echo/Call with a 12 KB frame (a 64x64 RGB image), for
// benchmarks/grpc_front_split.py: what the server half of a call costs when the front is not
// Python. It records CLOCK_MONOTONIC at handler entry and exit of every call; a request whose data
// is "dump" is answered with those marks ("entry exit\n" per call, nanoseconds) and not recorded.
// Prints its port on stdout once it listens.
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdio>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "echo.grpc.pb.h"

namespace {

long long monotonic_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}

class EchoService final : public rtdiff::bench::Echo::Service {
 public:
  grpc::Status Call(grpc::ServerContext*, const rtdiff::bench::Blob* request,
                    rtdiff::bench::Blob* reply) override {
    const long long entry = monotonic_ns();
    if (request->data() == "dump") {
      std::lock_guard<std::mutex> lock(mu_);
      std::string text;
      for (const auto& [in, out] : marks_) text += std::to_string(in) + " " + std::to_string(out) + "\n";
      reply->set_data(text);
      return grpc::Status::OK;
    }
    reply->set_data(frame_);
    std::lock_guard<std::mutex> lock(mu_);
    marks_.emplace_back(entry, monotonic_ns());
    return grpc::Status::OK;
  }

 private:
  const std::string frame_ = std::string(64 * 64 * 3, '\x07');
  std::mutex mu_;
  std::vector<std::pair<long long, long long>> marks_;
};

}  // namespace

int main() {
  EchoService service;
  int port = 0;
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    std::fprintf(stderr, "echo_server: could not listen\n");
    return 1;
  }
  std::printf("%d\n", port);
  std::fflush(stdout);
  server->Wait();
  return 0;
}
