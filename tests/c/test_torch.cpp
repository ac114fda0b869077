// The libtorch adapter: forward values and gradients equal the wrapper's, from the same
// draws (twin ops with the same seed), and training steps run through backward().
#include <torch/torch.h>

#include <cstdio>

#include "expect.hpp"
#include "perturbations_torch.hpp"


static pert::Config config() {
  pert::Config c;
  c.num_samples(5000).sigma(0.5).noise(pert::Noise::Gumbel).device("cpu").seed(4);
  return c;
}

int main() {
  auto theta = torch::tensor({0.3f, -0.2f, 0.9f, 0.1f, 0.5f, 0.5f}).reshape({2, 3}).requires_grad_(true);
  auto g = torch::tensor({1.0f, -1.0f, 0.5f, 0.0f, 2.0f, -0.5f}).reshape({2, 3});
  std::vector<float> theta_v = {0.3f, -0.2f, 0.9f, 0.1f, 0.5f, 0.5f}, g_v = {1.0f, -1.0f, 0.5f, 0.0f, 2.0f, -0.5f};

  pert::Op op = pert::Op::builtin(config(), pert::Builtin::Argmax, {3});
  pert::Op twin = pert::Op::builtin(config(), pert::Builtin::Argmax, {3});
  auto y = pert::torch::perturbed(op, theta);
  EXPECT(y.sizes() == theta.sizes());
  (y * g).sum().backward();
  auto expected = twin.forward_with_tape(theta_v, 2);
  auto vjp = expected.tape.vjp(g_v);
  for (int i = 0; i < 6; i++) {
    EXPECT(y.view(-1)[i].item<float>() == expected.output[i]);
    EXPECT(std::abs(theta.grad().view(-1)[i].item<float>() - vjp[i]) < 1e-5);
  }

  theta.grad().zero_();
  auto y_true = torch::tensor({0.0f, 0.0f, 1.0f, 1.0f, 0.0f, 0.0f}).reshape({2, 3});
  auto loss = pert::torch::fenchel_young(op, theta, y_true);
  EXPECT(loss.sizes() == torch::IntArrayRef({2}));
  loss.sum().backward();
  auto fy = twin.fenchel_young(theta_v, {0, 0, 1, 1, 0, 0}, 2);
  for (int i = 0; i < 6; i++) EXPECT(std::abs(theta.grad().view(-1)[i].item<float>() - fy.second[i]) < 1e-6);
  for (int b = 0; b < 2; b++) EXPECT(std::abs(loss[b].item<float>() - fy.first[b]) < 1e-6);

  // a non-square op: output [batch, 1]
  pert::Op any(config(), {3}, {}, [](const float* x, std::size_t count, float* out) {
    for (std::size_t r = 0; r < count; r++) out[r] = x[3 * r] > 0 ? 1.0f : -1.0f;
  });
  auto scalar = pert::torch::perturbed(any, theta.detach());
  EXPECT(scalar.sizes() == torch::IntArrayRef({2, 1}));

  return expect_report();
}
