// A libtorch program that links the installed library through perturbations::torch.
#include <torch/torch.h>

#include <cstdio>

#include "perturbations_torch.hpp"

int main() {
  pert::Config config;
  config.device("cpu").num_samples(1000);
  pert::Op op = pert::Op::builtin(config, pert::Builtin::Argmax, {3});
  auto theta = torch::tensor({0.1f, 0.9f, 0.3f}).reshape({1, 3}).requires_grad_(true);
  auto y = pert::autograd::perturbed(op, theta);
  y.sum().backward();
  std::printf("perturbed argmax: %.3f %.3f %.3f\n", y[0][0].item<float>(), y[0][1].item<float>(), y[0][2].item<float>());
  return theta.grad().defined() && std::abs(y.sum().item<float>() - 1.0f) < 1e-5 ? 0 : 1;
}
