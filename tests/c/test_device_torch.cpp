// A device solver written with libtorch C++ (pert_op_new_device): it wraps the rows where
// the op's data lives (from_blob on the op's device) and writes the one-hot argmax there,
// so nothing goes through the host. On the CPU here; on a GPU machine with
// PERT_TEST_DEVICE=cuda (scripts/gpu-check.sh), with device pointers and the stream.
// Checked against the closed form: Gumbel noise + argmax gives softmax(theta / sigma), and
// the VJP the softmax Jacobian's, within 5 standard deviations.
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "perturbations.h"

namespace {

constexpr int64_t kD = 4;

struct Solver {
  torch::Device device;
  int calls = 0;
  bool streams_ok = true;
};

int32_t torch_argmax(void* user_data, const pert_solve_info* info, const float* x, size_t count, float* y,
                     void* stream) {
  auto* s = static_cast<Solver*>(user_data);
  s->calls++;
  // the library works on the default stream: it passes NULL (on the CPU always NULL)
  int expected_device = s->device.is_cuda() ? s->device.index() : -1;
  if (s->device.is_cuda() && expected_device < 0) expected_device = 0;
  s->streams_ok = s->streams_ok && stream == nullptr && info->worker == 0 && info->device == expected_device;
  try {
    auto options = torch::TensorOptions().dtype(torch::kFloat).device(s->device);
    auto xs = torch::from_blob(const_cast<float*>(x), {static_cast<int64_t>(count), kD}, options);
    auto ys = torch::from_blob(y, {static_cast<int64_t>(count), kD}, options);
    ys.copy_(torch::one_hot(xs.argmax(1), kD).to(torch::kFloat));
    return 0;
  } catch (const std::exception& e) {
    pert_solver_set_error(e.what());
    return 1;
  }
}

int failures = 0;
void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "  FAILED: %s\n", what);
    failures++;
  }
}

}  // namespace

int main() {
  const char* env = std::getenv("PERT_TEST_DEVICE");
  std::string device = env && *env ? env : "cpu";
  Solver solver{device == "cpu" ? torch::Device(torch::kCPU) : torch::Device(device)};
  const double sigma = 0.5;
  const int n = 20000, batch = 3;
  pert_config* c = nullptr;
  pert_config_new(&c);
  pert_config_set_num_samples(c, n);
  pert_config_set_sigma(c, sigma);
  pert_config_set_noise(c, PERT_NOISE_GUMBEL);
  pert_config_set_seed(c, 17);
  if (pert_config_set_device(c, device.c_str()) != PERT_STATUS_OK) {
    // (scripts/gpu-check.sh sets PERT_REQUIRE_GPU: there, a skip is a failure)
    const char* required = std::getenv("PERT_REQUIRE_GPU");
    bool fail = required && *required;
    std::printf("device %s not available: %s\n", device.c_str(), fail ? "FAILED (PERT_REQUIRE_GPU is set)" : "skipped");
    return fail ? 1 : 0;
  }
  int64_t shape[1] = {kD};
  pert_op* op = nullptr;
  expect(pert_op_new_device(c, shape, 1, shape, 1, torch_argmax, &solver, &op) == PERT_STATUS_OK, "pert_op_new_device");
  float theta[batch * kD] = {0.1f, 0.9f, -0.3f, 0.4f, 0.0f, 0.2f, 0.5f, -0.1f, 1.0f, -1.0f, 0.3f, 0.2f};
  float y[batch * kD], g[batch * kD], out[batch * kD];
  for (int i = 0; i < batch * kD; i++) g[i] = static_cast<float>(i % 3) - 1.0f;
  pert_tape* tape = nullptr;
  pert_status status = pert_forward(op, theta, batch, y, &tape);
  if (status != PERT_STATUS_OK) {
    char message[512];
    pert_last_error(message, sizeof message);
    std::fprintf(stderr, "pert_forward: %s\n", message);
    return 1;
  }
  expect(pert_tape_vjp(tape, g, out) == PERT_STATUS_OK, "pert_tape_vjp");
  expect(solver.calls >= 1 && solver.streams_ok, "the solver was called with a NULL stream");
  for (int b = 0; b < batch; b++) {
    double z = 0, gp = 0, p[kD];
    for (int i = 0; i < kD; i++) z += std::exp(theta[b * kD + i] / sigma);
    for (int i = 0; i < kD; i++) p[i] = std::exp(theta[b * kD + i] / sigma) / z;
    for (int i = 0; i < kD; i++) gp += g[b * kD + i] * p[i];
    for (int i = 0; i < kD; i++) {
      expect(std::fabs(y[b * kD + i] - p[i]) <= 5 * std::sqrt(p[i] * (1 - p[i]) / n), "forward = softmax");
      double vjp = p[i] * (g[b * kD + i] - gp) / sigma;
      expect(std::fabs(out[b * kD + i] - vjp) <= 5 / (sigma * std::sqrt(double(n))), "VJP = softmax Jacobian's");
    }
  }
  pert_tape_free(tape);
  pert_op_free(op);
  pert_config_free(c);
  std::printf("device solver with libtorch on %s: %d chunk calls, %s\n", device.c_str(), solver.calls,
              failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
