// The libtorch adapter against the tape it keeps: built-in argmax, d = 2000, batch 64,
// N = 100, forward + backward through pert::autograd::perturbed ("adapter") or
// Op::forward_with_tape + Tape::vjp ("tape"). Prints {"time": s, "peak_mib": MiB}: the
// median of 5 calls after a warm-up, and the peak resident memory of one call above the
// resident size before it. Run once per mode, each in its own process.
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "perturbations_torch.hpp"

static long status_kib(const char* field) {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind(field, 0) == 0) return std::stol(line.substr(std::strlen(field)));
  return 0;
}

// Resets the peak resident size (VmHWM) to the current one.
static void reset_peak() { std::ofstream("/proc/self/clear_refs") << "5"; }

int main(int argc, char** argv) {
  bool adapter = argc > 1 && std::strcmp(argv[1], "adapter") == 0;
  const int64_t batch = 64, d = 2000;
  pert::Config c;
  c.num_samples(100).sigma(0.1).device("cpu").seed(1);
  pert::Op op = pert::Op::builtin(c, pert::Builtin::Argmax, {d});
  torch::manual_seed(0);
  auto theta = torch::randn({batch, d});
  std::vector<float> theta_v(theta.data_ptr<float>(), theta.data_ptr<float>() + batch * d);
  auto run = [&] {
    if (adapter) {
      auto t = theta.clone().requires_grad_(true);
      auto y = pert::autograd::perturbed(op, t);
      y.backward(y.detach());
      return t.grad().sum().item<float>();
    }
    auto result = op.forward_with_tape(theta_v, static_cast<std::size_t>(batch));
    auto g = result.tape.vjp(result.output);
    return g[0];
  };
  run();  // warm-up
  reset_peak();
  long before = status_kib("VmRSS:");
  run();
  long peak = status_kib("VmHWM:") - before;
  std::vector<double> times;
  for (int i = 0; i < 5; i++) {
    auto a = std::chrono::steady_clock::now();
    run();
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count());
  }
  std::sort(times.begin(), times.end());
  std::printf("{\"time\": %.6f, \"peak_mib\": %.1f}\n", times[2], std::max(peak, 0L) / 1024.0);
  return 0;
}
