// A C++ program that links the installed library through the installed wrapper.
#include <cstdio>

#include "perturbations.hpp"

int main() {
  pert::Config config;
  config.device("cpu").num_samples(1000);
  pert::Op op = pert::Op::builtin(config, pert::Builtin::Ranks, {3});
  auto y = op.forward({0.1f, 0.9f, 0.3f}, 1);
  std::printf("ranks: %.2f %.2f %.2f\n", y[0], y[1], y[2]);
  return (y[0] + y[1] + y[2] > 5.999f && y[0] + y[1] + y[2] < 6.001f) ? 0 : 1;
}
