// The C++ wrapper under C++20: any contiguous range of float is a buffer (std::span of
// float or const float, std::array, std::vector), and temporaries never dangle.
#include <array>
#include <span>
#include <vector>

#include "expect.hpp"
#include "perturbations.hpp"

int main() {
  pert::Config c;
  c.num_samples(20).device("cpu");
  auto identity = [](const float* x, std::size_t count, float* y) {
    for (std::size_t i = 0; i < count * 3; i++) y[i] = x[i];
  };
  pert::Op op(c, {3}, {3}, identity);
  std::vector<float> v = {0.1f, 2.0f, 0.3f};
  std::array<float, 3> a = {0.1f, 2.0f, 0.3f};
  EXPECT(op.forward(std::span<float>(v), 1).size() == 3);
  EXPECT(op.forward(std::span<const float>(v), 1).size() == 3);
  EXPECT(op.forward(std::array<float, 3>{0.1f, 2.0f, 0.3f}, 1).size() == 3);
  EXPECT(op.forward(a, 1).size() == 3);
  EXPECT(op.forward(v, 1).size() == 3);
  pert::View span_view = std::span<float>(v);  // a view of v: borrowed, no copy
  EXPECT(span_view.data == v.data());
  pert::View array_view = std::array<float, 3>{0.1f, 2.0f, 0.3f};  // a temporary: copied
  EXPECT(array_view.size == 3 && array_view.data[1] == 2.0f);
  auto result = op.forward_with_tape(a, 1);
  EXPECT(result.tape.vjp(std::span<const float>(result.output)).size() == 3);
  return expect_report();
}
