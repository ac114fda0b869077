// A second translation unit including the wrapper: linking it with test_cpp.cpp fails if
// the header defines anything non-inline.
#include "perturbations.hpp"

int pert_tu_b_forward() {
  pert::Config c;
  c.num_samples(10).device("cpu");
  pert::Op op(c, {3}, {3}, [](const float* x, std::size_t count, float* y) {
    for (std::size_t i = 0; i < count * 3; i++) y[i] = x[i];
  });
  return static_cast<int>(op.forward({1, 2, 3}, 1).size());
}
