// A libtorch C++ model trained through a perturbed argmax: a linear classifier learns a
// hidden linear labelling from the Fenchel-Young loss, with loss.backward() and SGD only.
#include <torch/torch.h>

#include <cstdio>

#include "perturbations_torch.hpp"

int main() {
  ::torch::manual_seed(0);
  const int64_t n = 256, features = 4, classes = 3;
  auto x = ::torch::randn({n, features});
  auto w_true = ::torch::randn({features, classes}) * 2;
  auto labels = x.matmul(w_true).argmax(1);
  auto y_true = ::torch::one_hot(labels, classes).to(::torch::kFloat);

  ::torch::nn::Linear model(features, classes);
  ::torch::optim::SGD optimizer(model->parameters(), ::torch::optim::SGDOptions(0.5));

  pert::Config config;
  config.num_samples(200).sigma(1.0).noise(pert::Noise::Gumbel).device("cpu");
  pert::Op op = pert::Op::builtin(config, pert::Builtin::Argmax, {classes});

  for (int step = 0; step <= 100; step++) {
    optimizer.zero_grad();
    auto theta = model->forward(x);
    auto loss = pert::autograd::fenchel_young(op, theta, y_true).mean();
    loss.backward();
    optimizer.step();
    if (step % 25 == 0) {
      auto accuracy = model->forward(x).argmax(1).eq(labels).to(::torch::kFloat).mean().item<float>();
      std::printf("step %3d  Fenchel-Young loss %.3f  accuracy %.2f\n", step, loss.item<float>(), accuracy);
    }
  }
  // the perturbed argmax itself is differentiable too
  auto theta = model->forward(x.slice(0, 0, 2)).detach().requires_grad_(true);
  auto y = pert::autograd::perturbed(op, theta);
  y.select(1, 0).sum().backward();
  std::printf("d y[:, 0] / d theta (first problem): %.3f %.3f %.3f\n", theta.grad()[0][0].item<float>(),
              theta.grad()[0][1].item<float>(), theta.grad()[0][2].item<float>());
  auto final_accuracy = model->forward(x).argmax(1).eq(labels).to(::torch::kFloat).mean().item<float>();
  return final_accuracy > 0.85f ? 0 : 1;
}
