// The libtorch adapter: forward values and gradients equal the wrapper's, from the same
// draws (twin ops with the same seed), and training steps run through backward().
#include <torch/torch.h>

#include <cstdio>
#include <functional>

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
  auto y = pert::autograd::perturbed(op, theta);
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
  auto loss = pert::autograd::fenchel_young(op, theta, y_true);
  EXPECT(loss.sizes() == torch::IntArrayRef({2}));
  loss.sum().backward();
  auto fy = twin.fenchel_young(theta_v, {0, 0, 1, 1, 0, 0}, 2);
  for (int i = 0; i < 6; i++) EXPECT(std::abs(theta.grad().view(-1)[i].item<float>() - fy.second[i]) < 1e-6);
  for (int b = 0; b < 2; b++) EXPECT(std::abs(loss[b].item<float>() - fy.first[b]) < 1e-6);

  // a non-square op: output [batch, 1]
  pert::Op any(config(), {3}, {}, [](const float* x, std::size_t count, float* out) {
    for (std::size_t r = 0; r < count; r++) out[r] = x[3 * r] > 0 ? 1.0f : -1.0f;
  });
  auto scalar = pert::autograd::perturbed(any, theta.detach());
  EXPECT(scalar.sizes() == torch::IntArrayRef({2, 1}));

  // the target's gradient: -theta (maximization), +theta (minimization), times the
  // incoming gradient per problem
  for (auto sense : {pert::Sense::Maximize, pert::Sense::Minimize}) {
    pert::Config c = config();
    c.sense(sense);
    // (the built-ins maximize: a callback for each sense)
    pert::Op fy_op(c, {3}, {3}, [sense](const float* x, std::size_t count, float* out) {
      float s = sense == pert::Sense::Maximize ? 1.0f : -1.0f;
      for (std::size_t r = 0; r < count; r++) {
        int best = 0;
        for (int i = 1; i < 3; i++)
          if (s * x[3 * r + i] > s * x[3 * r + best]) best = i;
        for (int i = 0; i < 3; i++) out[3 * r + i] = i == best ? 1.0f : 0.0f;
      }
    });
    auto th = theta.detach().clone().requires_grad_(true);
    auto target = y_true.clone().requires_grad_(true);
    auto l = pert::autograd::fenchel_young(fy_op, th, target);
    (l * torch::tensor({1.0f, 2.0f})).sum().backward();
    float sign = sense == pert::Sense::Maximize ? -1.0f : 1.0f;
    auto want = th.detach() * torch::tensor({1.0f, 1.0f, 1.0f, 2.0f, 2.0f, 2.0f}).reshape({2, 3}) * sign;
    EXPECT((target.grad() - want).abs().max().item<float>() < 1e-6);
  }

  // no tape when no gradient can be asked: the clean-input baseline's extra solve per
  // problem is made only by calls with a tape
  {
    std::size_t rows = 0;
    pert::Config c = config();
    c.num_samples(10).baseline(pert::Baseline::CleanInput);
    pert::Op counted(c, {3}, {3}, [&rows](const float* x, std::size_t count, float* out) {
      rows += count;
      for (std::size_t r = 0; r < count; r++)
        for (int i = 0; i < 3; i++) out[3 * r + i] = (x[3 * r + i] >= x[3 * r] && x[3 * r + i] >= x[3 * r + 1] && x[3 * r + i] >= x[3 * r + 2]) ? 1.0f : 0.0f;
    });
    auto needs = theta.detach().clone().requires_grad_(true);
    rows = 0;
    auto with_tape = pert::autograd::perturbed(counted, needs);
    EXPECT(rows == 2 * 10 + 2 && with_tape.requires_grad());
    rows = 0;
    {
      torch::NoGradGuard guard;
      auto without = pert::autograd::perturbed(counted, needs);
      EXPECT(!without.requires_grad());
    }
    EXPECT(rows == 2 * 10);
    rows = 0;
    pert::autograd::perturbed(counted, theta.detach());
    EXPECT(rows == 2 * 10);
    // the graph keeps the tape: backward works after the op is gone
    pert::Op* short_lived = new pert::Op(pert::Op::builtin(config(), pert::Builtin::Argmax, {3}));
    auto th = theta.detach().clone().requires_grad_(true);
    auto out = pert::autograd::perturbed(*short_lived, th);
    delete short_lived;
    out.sum().backward();
    EXPECT(th.grad().defined());
    // the tape is a saved variable: released by backward, so a second backward is refused
    bool refused = false;
    try {
      out.sum().backward();
    } catch (const std::exception&) {
      refused = true;
    }
    EXPECT(refused);
  }

  // a second derivative through either function fails loudly (a gradient penalty would
  // otherwise silently lack the Hessian term), while create_graph itself still works
  for (int which = 0; which < 2; which++) {
    auto th = theta.detach().clone().requires_grad_(true);
    auto out = which == 0 ? pert::autograd::fenchel_young(op, th, y_true).sum()
                          : (pert::autograd::perturbed(op, th) * g).sum();
    auto grads = torch::autograd::grad({out}, {th}, {}, /*retain_graph=*/true, /*create_graph=*/true);
    EXPECT(grads[0].requires_grad());
    bool refused = false;
    try {
      torch::autograd::grad({grads[0].pow(2).sum()}, {th});
    } catch (const c10::Error& e) {
      refused = std::string(e.what()).find("differentiable once") != std::string::npos;
    }
    EXPECT(refused);
    // without create_graph the gradient is plain (no graph of the backward is made)
    auto th2 = theta.detach().clone().requires_grad_(true);
    auto out2 = which == 0 ? pert::autograd::fenchel_young(op, th2, y_true).sum()
                           : (pert::autograd::perturbed(op, th2) * g).sum();
    auto plain = torch::autograd::grad({out2}, {th2});
    EXPECT(!plain[0].requires_grad());
    // what backward does not read may change in place between forward and backward:
    // theta of perturbed (the tape holds what backward needs), the target of the loss
    // (whose gradient with respect to the target is made from theta, which must not)
    auto th3 = theta.detach().clone().requires_grad_(true);
    auto target = y_true.clone();
    auto out3 = which == 0 ? pert::autograd::fenchel_young(op, th3, target).sum()
                           : (pert::autograd::perturbed(op, th3) * g).sum();
    {
      torch::NoGradGuard no_grad;
      if (which == 1) th3.add_(1.0);
      target.zero_();
    }
    bool backward_ok = true;
    try {
      out3.backward();
    } catch (const c10::Error&) {
      backward_ok = false;
    }
    EXPECT(backward_ok && th3.grad().defined());
  }

  // the decision-focused methods over the exact solver: the adapter's values and gradients
  // are the wrapper's (pert::Op), which are the C library's
  {
    pert::Config c = config();
    c.sense(pert::Sense::Minimize);
    auto argmin = [](const float* x, std::size_t count, float* out) {
      for (std::size_t r = 0; r < count; r++) {
        int best = 0;
        for (int i = 1; i < 3; i++)
          if (x[3 * r + i] < x[3 * r + best]) best = i;
        for (int i = 0; i < 3; i++) out[3 * r + i] = i == best ? 1.0f : 0.0f;
      }
    };
    pert::Op min_op(c, {3}, {3}, argmin);
    // SPO+: problem 0 by hand (q = 2 pred - c = (5, 0, 1): loss 5, grad 2 (e0 - e1)); problem 1 at the truth
    auto pred = torch::tensor({3.0f, 1.0f, 2.0f, 0.5f, -1.0f, 2.0f}).reshape({2, 3}).requires_grad_(true);
    auto cost = torch::tensor({1.0f, 2.0f, 3.0f, 0.5f, -1.0f, 2.0f}).reshape({2, 3});
    auto sol = torch::tensor({1.0f, 0.0f, 0.0f, 0.0f, 1.0f, 0.0f}).reshape({2, 3});
    auto obj = torch::tensor({1.0f, -1.0f}).reshape({2, 1});
    auto spo = pert::autograd::spo_plus(min_op, pred, cost, sol, obj);
    EXPECT(spo.sizes() == torch::IntArrayRef({2}));
    EXPECT(spo[0].item<float>() == 5.0f && spo[1].item<float>() == 0.0f);
    (spo * torch::tensor({1.0f, 3.0f})).sum().backward();
    auto want = torch::tensor({2.0f, -2.0f, 0.0f, 0.0f, 0.0f, 0.0f}).reshape({2, 3});
    EXPECT(pred.grad().equal(want));
    auto plain = min_op.spo_plus(std::vector<float>{3, 1, 2, 0.5f, -1, 2}, std::vector<float>{1, 2, 3, 0.5f, -1, 2},
                                 std::vector<float>{1, 0, 0, 0, 1, 0}, std::vector<float>{1, -1}, 2);
    EXPECT(plain.first[0] == 5.0f && plain.second[0] == 2.0f && plain.second[1] == -2.0f);

    // DBB: y*(1, 2, 3) = e0; backward at theta + 1.5 g = (2.5, 2, 3): e1; grad (e1 - e0) / 1.5
    auto th = torch::tensor({1.0f, 2.0f, 3.0f}).reshape({1, 3}).requires_grad_(true);
    auto y_dbb = pert::autograd::blackbox(min_op, th, 1.5);
    EXPECT(y_dbb.equal(torch::tensor({1.0f, 0.0f, 0.0f}).reshape({1, 3})));
    (y_dbb * torch::tensor({1.0f, 0.0f, 0.0f}).reshape({1, 3})).sum().backward();
    EXPECT(th.grad().equal(torch::tensor({-1.0f / 1.5f, 1.0f / 1.5f, 0.0f}).reshape({1, 3})));
    auto dbb = min_op.blackbox_vjp(std::vector<float>{1, 2, 3}, std::vector<float>{1, 0, 0},
                                   std::vector<float>{1, 0, 0}, 1, 1.5);
    EXPECT(dbb[0] == -1.0f / 1.5f && dbb[1] == 1.0f / 1.5f);
    bool refused = false;
    try {
      pert::autograd::blackbox(min_op, th, 0.0);
    } catch (const pert::Error& e) {
      refused = e.status() == PERT_STATUS_INVALID_ARGUMENT;
    }
    EXPECT(refused);

    // the pool losses through autograd: pointwise LTR by hand (pool e0, e1, e2; pred (1, 2, 4),
    // c (3, 1, 2): loss 3, grad -2/3 (2, -1, -2))
    {
      pert::Config pc = config();
      pc.sense(pert::Sense::Minimize).linear_objective(true);
      pert::Op pooled(pc, {3}, {3}, argmin);
      pert::Pool pool({3}, 10);
      pool.add(std::vector<float>{1, 0, 0, 0, 1, 0, 0, 0, 1}, 3);
      pooled.set_pool(pool);
      auto p = torch::tensor({1.0f, 2.0f, 4.0f}).reshape({1, 3}).requires_grad_(true);
      auto l = pert::autograd::ltr_pointwise(pooled, p, torch::tensor({3.0f, 1.0f, 2.0f}).reshape({1, 3}));
      EXPECT(std::fabs(l[0].item<float>() - 3.0f) < 1e-6f);
      l.sum().backward();
      auto want = torch::tensor({-4.0f / 3, 2.0f / 3, 4.0f / 3}).reshape({1, 3});
      EXPECT(p.grad().allclose(want, 1e-6, 1e-6));
      auto n = pert::autograd::nce(pooled, p.detach(), torch::tensor({0.0f, 1.0f, 0.0f}).reshape({1, 3}));
      EXPECT(std::fabs(n[0].item<float>() + 1.0f / 3) < 1e-6f);
    }

    // NID: -g minimizing
    auto th2 = torch::tensor({1.0f, 2.0f, 3.0f}).reshape({1, 3}).requires_grad_(true);
    auto g2 = torch::tensor({0.5f, -1.0f, 2.0f}).reshape({1, 3});
    (pert::autograd::negative_identity(min_op, th2) * g2).sum().backward();
    EXPECT(th2.grad().equal(-g2));

    // PG by hand: (pred +- c) = (4, 3, 5) -> e1, (-2, 1, 1) -> e0; loss (3 + 2) / 2, grad (e1 - e0) / 2
    auto p3 = torch::tensor({1.0f, 2.0f, 3.0f}).reshape({1, 3}).requires_grad_(true);
    auto pg = pert::autograd::perturbation_gradient(min_op, p3, torch::tensor({3.0f, 1.0f, 2.0f}).reshape({1, 3}), 1.0);
    EXPECT(pg.item<float>() == 2.5f);
    pg.sum().backward();
    EXPECT(p3.grad().equal(torch::tensor({-0.5f, 0.5f, 0.0f}).reshape({1, 3})));
    auto one_sided = min_op.perturbation_gradient(std::vector<float>{1, 2, 3}, std::vector<float>{3, 1, 2}, 1, 1.0, false);
    EXPECT(one_sided.first[0] == 3.0f);

    // the solve layers keep no cycle: once the graph is gone, its node is freed
    {
      std::weak_ptr<torch::autograd::Node> node;
      {
        auto th5 = pred.detach().clone().requires_grad_(true);
        auto y5 = pert::autograd::blackbox(min_op, th5, 10.0);
        node = y5.grad_fn();
        EXPECT(!node.expired());
        (y5 * cost).sum().backward();
      }
      EXPECT(node.expired());
      // an in-place change of the output before backward is caught (the output is a saved variable)
      auto th6 = pred.detach().clone().requires_grad_(true);
      auto y6 = pert::autograd::negative_identity(min_op, th6);
      auto l6 = (y6 * cost).sum();
      {
        torch::NoGradGuard no_grad;
        y6.add_(1.0);
      }
      bool caught = false;
      try {
        l6.backward();
      } catch (const c10::Error&) {
        caught = true;
      }
      EXPECT(caught);
    }

    // I-MLE and AI-MLE: the adapter's gradient is the wrapper's from a twin op's record
    {
      pert::Config ic = config();
      ic.num_samples(16).noise(pert::Noise::SumOfGamma).sense(pert::Sense::Minimize);
      pert::Op a(ic, {3}, {3}, argmin), b(ic, {3}, {3}, argmin);
      auto th7 = pred.detach().clone().requires_grad_(true);
      auto y7 = pert::autograd::imle(a, th7, 2.0);
      (y7 * cost).sum().backward();
      auto p7 = pred.detach().contiguous();
      std::vector<float> pv(p7.data_ptr<float>(), p7.data_ptr<float>() + 6);
      auto c7 = cost.contiguous();
      std::vector<float> cv(c7.data_ptr<float>(), c7.data_ptr<float>() + 6);
      auto twin = b.imle_forward(pv, 2);
      auto want = b.imle_vjp(twin.second, cv, 2.0);
      for (int i = 0; i < 6; i++) {
        EXPECT(std::abs(y7.view(-1)[i].item<float>() - twin.first[i]) < 1e-6);
        EXPECT(std::abs(th7.grad().view(-1)[i].item<float>() - want[i]) < 1e-6);
      }
      pert_aimle_state state = pert_aimle_state_default();
      auto th8 = pred.detach().clone().requires_grad_(true);
      (pert::autograd::aimle(a, th8, state) * cost).sum().backward();
      EXPECT(th8.grad().defined() && state.alpha != 1.0);
      // no problem: an empty result and an empty gradient; AI-MLE's state is kept
      pert_aimle_state kept = pert_aimle_state_default();
      for (int adaptive = 0; adaptive < 2; adaptive++) {
        auto th9 = ::torch::zeros({0, 3}).requires_grad_(true);
        auto y9 = adaptive ? pert::autograd::aimle(a, th9, kept) : pert::autograd::imle(a, th9, 2.0, true);
        EXPECT(y9.size(0) == 0 && y9.size(1) == 3);
        y9.sum().backward();
        EXPECT(th9.grad().defined() && th9.grad().size(0) == 0);
      }
      EXPECT(kept.alpha == 1.0 && kept.grad_norm_avg == 1.0);
    }

    // a non-finite incoming gradient (an overflow under mixed precision) gives NaN for its
    // problem and the others their own gradient, with no exception, as in PyTorch; NID
    // passes -g through exactly; AI-MLE's state is left as it was
    {
      pert::Config nc = config();
      nc.num_samples(16).sense(pert::Sense::Minimize);
      auto bad = torch::tensor({1.0f, -1.0f, 0.5f, INFINITY, 2.0f, -0.5f}).reshape({2, 3});
      auto clean = torch::tensor({1.0f, -1.0f, 0.5f, 0.0f, 0.0f, 0.0f}).reshape({2, 3});
      using Layer = std::function<torch::Tensor(pert::Op&, const torch::Tensor&)>;
      pert_aimle_state state = pert_aimle_state_default();
      std::vector<Layer> layers = {
          [](pert::Op& o, const torch::Tensor& t) { return pert::autograd::perturbed(o, t); },
          [](pert::Op& o, const torch::Tensor& t) { return pert::autograd::blackbox(o, t, 2.0); },
          [](pert::Op& o, const torch::Tensor& t) { return pert::autograd::imle(o, t, 2.0); },
          [&state](pert::Op& o, const torch::Tensor& t) { return pert::autograd::aimle(o, t, state); }};
      for (auto& layer : layers) {
        pert::Op a(nc, {3}, {3}, argmin), b(nc, {3}, {3}, argmin);  // (twins: the same draws)
        auto th_bad = pred.detach().clone().requires_grad_(true);
        auto th_clean = pred.detach().clone().requires_grad_(true);
        layer(a, th_bad).backward(bad);
        layer(b, th_clean).backward(clean);
        EXPECT(torch::isnan(th_bad.grad()[1]).all().item<bool>());
        EXPECT(torch::equal(th_bad.grad()[0], th_clean.grad()[0]));
      }
      // one step of alpha: the clean call's
      EXPECT(std::abs(state.alpha - 1.001) < 1e-12 || std::abs(state.alpha - 0.999) < 1e-12);
      pert_aimle_state kept = pert_aimle_state_default();
      pert::Op a(nc, {3}, {3}, argmin);
      auto th = pred.detach().clone().requires_grad_(true);
      pert::autograd::aimle(a, th, kept).backward(bad);
      EXPECT(kept.alpha == 1.0 && kept.grad_norm_avg == 1.0);
      auto th_nid = pred.detach().clone().requires_grad_(true);
      pert::autograd::negative_identity(a, th_nid).backward(bad);
      EXPECT(torch::equal(th_nid.grad()[0], -bad[0]) && torch::isnan(th_nid.grad()[1]).all().item<bool>());
      // the op's own sense, also when it was set through the raw config handle
      pert::Config raw = config();
      EXPECT(pert_config_set_sense(raw.get(), PERT_SENSE_MINIMIZE) == PERT_STATUS_OK);
      pert::Op r(raw, {3}, {3}, argmin);
      auto th_raw = pred.detach().clone().requires_grad_(true);
      pert::autograd::negative_identity(r, th_raw).backward(clean);
      EXPECT(torch::equal(th_raw.grad(), -clean));
      EXPECT(r.sense() == pert::Sense::Minimize);
      // and the Fenchel-Young loss's gradient in y_true: +theta when minimizing
      auto target = torch::tensor({1.0f, 0.0f, 0.0f, 0.0f, 1.0f, 0.0f}).reshape({2, 3}).requires_grad_(true);
      pert::autograd::fenchel_young(r, pred.detach(), target).sum().backward();
      EXPECT((target.grad() - pred.detach()).abs().max().item<float>() < 1e-6);
    }

    // the solve layers need a linear objective: a non-square op is refused in forward
    {
      pert::Op narrow(c, {3}, {1}, [](const float*, std::size_t count, float* out) {
        for (std::size_t r = 0; r < count; r++) out[r] = 0.0f;
      });
      bool refused = false;
      try {
        pert::autograd::negative_identity(narrow, pred.detach());
      } catch (const pert::Error& e) {
        refused = e.status() == PERT_STATUS_INVALID_ARGUMENT;
      }
      EXPECT(refused);
    }

    // a second derivative through a method's gradient fails loudly
    auto th4 = pred.detach().clone().requires_grad_(true);
    auto l4 = pert::autograd::spo_plus(min_op, th4, cost, sol, obj).sum();
    auto g4 = torch::autograd::grad({l4}, {th4}, {}, true, true);
    bool loud = false;
    try {
      torch::autograd::grad({g4[0].pow(2).sum()}, {th4});
    } catch (const c10::Error& e) {
      loud = std::string(e.what()).find("differentiable once") != std::string::npos;
    }
    EXPECT(loud);
  }

  // a second derivative with respect to what the incoming gradient depends on (a weight w
  // of the loss) is refused too, not lost: the products were taken off the graph
  {
    auto w = torch::tensor({1.0f, -0.5f, 2.0f, 0.3f, 0.7f, -1.0f}).reshape({2, 3}).requires_grad_(true);
    for (int which = 0; which < 3; which++) {
      pert::Config c = config();
      pert::Op square(c, {3}, {3}, [](const float* x, std::size_t count, float* out) {
        for (std::size_t r = 0; r < count; r++)
          for (int i = 0; i < 3; i++)
            out[3 * r + i] = (x[3 * r + i] >= x[3 * r] && x[3 * r + i] >= x[3 * r + 1] && x[3 * r + i] >= x[3 * r + 2]) ? 1.0f : 0.0f;
      });
      auto th = theta.detach().clone().requires_grad_(true);
      auto y = which == 0 ? pert::autograd::perturbed(square, th)
             : which == 1 ? pert::autograd::blackbox(square, th, 2.0)
                          : pert::autograd::imle(square, th, 2.0);
      auto g_theta = torch::autograd::grad({(y * w).sum()}, {th}, {}, true, true);
      bool loud = false;
      try {
        torch::autograd::grad({g_theta[0].pow(2).sum()}, {w}, {}, false, false, /*allow_unused=*/true);
      } catch (const c10::Error& e) {
        loud = std::string(e.what()).find("differentiable once") != std::string::npos;
      }
      EXPECT(loud);
    }
  }

  // targets of another shape with the same size (a transposed one) are refused, not read
  // in the wrong order; so is an output_shape that is not the op's, before the forward runs
  {
    auto th = theta.detach().clone();
    auto shapes = [&](const std::function<void()>& call) {
      try {
        call();
      } catch (const pert::Error& e) {
        return e.status() == PERT_STATUS_INVALID_ARGUMENT && std::string(e.what()).find("shape") != std::string::npos;
      }
      return false;
    };
    auto transposed = y_true.t().contiguous();  // [3, 2] against theta's [2, 3]
    EXPECT(shapes([&] { pert::autograd::fenchel_young(op, th, transposed); }));
    pert::Config mc = config();
    mc.sense(pert::Sense::Maximize).linear_objective(true);
    pert::Op linear(mc, {3}, {3}, [](const float* x, std::size_t count, float* out) {
      for (std::size_t r = 0; r < count; r++)
        for (int i = 0; i < 3; i++) out[3 * r + i] = x[3 * r + i] > 0 ? 1.0f : 0.0f;
    });
    auto obj = torch::zeros({2});
    EXPECT(shapes([&] { pert::autograd::spo_plus(linear, th, transposed, y_true, obj); }));
    EXPECT(shapes([&] { pert::autograd::spo_plus(linear, th, th, transposed, obj); }));
    EXPECT(shapes([&] { pert::autograd::perturbation_gradient(linear, th, transposed, 0.1); }));
    EXPECT(shapes([&] { pert::autograd::nce(linear, th, transposed); }));
    EXPECT(shapes([&] { pert::autograd::ltr_listwise(linear, th, transposed); }));
    std::uint64_t before = linear.solver_calls();
    EXPECT(shapes([&] { pert::autograd::perturbed(linear, th, {4}); }));
    EXPECT(shapes([&] { pert::autograd::perturbed(linear, th, {3, 0}); }));
    EXPECT(shapes([&] { pert::autograd::perturbed(linear, th, {-1, -3}); }));
    // (a product that wraps int64 to the op's 3 values)
    EXPECT(shapes([&] { pert::autograd::perturbed(linear, th, {3, (int64_t(1) << 62) + 1, 4}); }));
    // the same problems shaped otherwise are accepted: [2, 3] targets as [2, 1, 3], and a
    // single problem without its batch dimension
    auto reshaped = pert::autograd::fenchel_young(op, th, y_true.reshape({2, 1, 3}));
    EXPECT(reshaped.sizes() == torch::IntArrayRef({2}));
    auto one = th.narrow(0, 0, 1).contiguous();
    EXPECT(pert::autograd::fenchel_young(op, one, y_true[0]).sizes() == torch::IntArrayRef({1}));
    EXPECT(linear.solver_calls() == before);
    EXPECT(pert::autograd::perturbed(linear, th, {1, 3}).sizes() == torch::IntArrayRef({2, 1, 3}));
  }

  return expect_report();
}
