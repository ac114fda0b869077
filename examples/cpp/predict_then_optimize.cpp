// Predict-then-optimize on the standard synthetic shortest-path benchmark of
// decision-focused learning, in libtorch C++: a linear model (5 features -> 40 edge costs)
// trained with every method of the library over one shortest-path solver: the
// Fenchel-Young loss (N = 1, 10), the perturbed optimizer (DPO, N = 10) under the
// decision's true cost <c, y_sigma(c^)>, SPO+, the differentiable black box (DBB, lambda
// 10) and the negative identity (NID) under the decision's true cost <c, y*(c^)>, and the
// perturbation gradient (PG, two-sided, sigma 1), and I-MLE (lambda 10) and AI-MLE with
// Sum-of-Gamma noise (kappa 5, 10 terms, N = 10) under <c, y_sigma(c^)>.
//
// Data: a 5x5 grid (40 edges that move right or down, top-left to bottom-right), features
// x ~ N(0, I_5), costs c_j = [(1/3.5^deg) ((B x)_j / sqrt(5) + 3)^deg + 1] * eps_j with
// B a fixed Bernoulli(0.5) 40x5 matrix and eps_j ~ U[0.5, 1.5]; 1000 training and 1000 test
// instances, for deg = 1, 4, 6. Training: minimization sense, Normal noise, sigma 1
// (default settings otherwise), Adam (lr 0.01), batch 32, 10 epochs. The solver is the dynamic program of
// examples/c/grid_shortest_path.c, run by pert_op_new_ex on 2 persistent workers.
//
// Printed per epoch: the test set's normalized regret
//     sum_i (c_i . w(c^_i) - c_i . w*(c_i)) / sum_i c_i . w*(c_i),
// and a table of method x deg with the seconds per epoch; written: the learning curves as
// an SVG (argv[1], default "regret.svg").
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "../c/grid_shortest_path.c"
#include "perturbations_torch.hpp"

namespace {

constexpr int kFeatures = 5;
constexpr int kEdges = GRID_EDGES;

struct Data {
  torch::Tensor x, c, w, z;  // features [n, 5], costs [n, 40], optimal paths [n, 40], their costs [n]
};

torch::Tensor solve_all(const torch::Tensor& costs) {
  auto c = costs.detach().to(torch::kFloat).contiguous();
  auto w = torch::empty_like(c);
  if (grid_shortest_path(nullptr, c.data_ptr<float>(), static_cast<size_t>(c.size(0)), w.data_ptr<float>()) != 0)
    throw std::runtime_error("the grid solver refused a cost vector");
  return w;
}

Data make_data(int n, int deg, const std::vector<float>& b, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> noise(0.5f, 1.5f);
  auto x = torch::empty({n, kFeatures});
  auto c = torch::empty({n, kEdges});
  auto xa = x.accessor<float, 2>();
  auto ca = c.accessor<float, 2>();
  for (int i = 0; i < n; i++) {
    for (int k = 0; k < kFeatures; k++) xa[i][k] = normal(rng);
    for (int j = 0; j < kEdges; j++) {
      double bx = 0;
      for (int k = 0; k < kFeatures; k++) bx += b[j * kFeatures + k] * xa[i][k];
      double base = std::pow(bx / std::sqrt(double(kFeatures)) + 3.0, deg) / std::pow(3.5, deg) + 1.0;
      ca[i][j] = static_cast<float>(base * noise(rng));
    }
  }
  auto w = solve_all(c);
  return Data{x, c, w, (c * w).sum(1)};
}

double regret(torch::nn::Linear& model, const Data& test) {
  torch::NoGradGuard no_grad;
  auto w_hat = solve_all(model->forward(test.x));
  auto chosen = (test.c * w_hat).sum();
  auto best = (test.c * test.w).sum();
  return ((chosen - best) / best).item<double>();
}

struct Curve {
  std::string method;
  int deg;
  std::vector<double> regret;
  double seconds_per_epoch;
};

// The decision's true cost <c, y> per instance (the regret up to a constant).
torch::Tensor decision_cost(const torch::Tensor& y, const torch::Tensor& c) { return (y * c).sum(1); }

// A method: its op's number of samples and its loss per instance of a batch.
struct Method {
  std::string name;
  int num_samples;
  pert::Noise noise;
  std::function<torch::Tensor(pert::Op&, const torch::Tensor& c_hat, const torch::Tensor& c, const torch::Tensor& w,
                              const torch::Tensor& z)>
      loss;
};

// AI-MLE's adaptive state, kept across the steps of one training (reset for each)
pert_aimle_state& aimle_state() {
  static pert_aimle_state state = pert_aimle_state_default();
  return state;
}

std::vector<Method> methods() {
  using T = const torch::Tensor&;
  return {
      {"fy-n1", 1, pert::Noise::Normal, [](pert::Op& op, T c_hat, T, T w, T) { return pert::autograd::fenchel_young(op, c_hat, w); }},
      {"fy-n10", 10, pert::Noise::Normal, [](pert::Op& op, T c_hat, T, T w, T) { return pert::autograd::fenchel_young(op, c_hat, w); }},
      {"dpo-n10", 10, pert::Noise::Normal,
       [](pert::Op& op, T c_hat, T c, T, T) { return decision_cost(pert::autograd::perturbed(op, c_hat), c); }},
      {"spo+", 1, pert::Noise::Normal, [](pert::Op& op, T c_hat, T c, T w, T z) { return pert::autograd::spo_plus(op, c_hat, c, w, z); }},
      {"dbb", 1, pert::Noise::Normal,
       [](pert::Op& op, T c_hat, T c, T, T) { return decision_cost(pert::autograd::blackbox(op, c_hat, 10.0), c); }},
      {"nid", 1, pert::Noise::Normal,
       [](pert::Op& op, T c_hat, T c, T, T) { return decision_cost(pert::autograd::negative_identity(op, c_hat), c); }},
      {"pg", 1, pert::Noise::Normal, [](pert::Op& op, T c_hat, T c, T, T) { return pert::autograd::perturbation_gradient(op, c_hat, c, 1.0); }},
      {"imle", 10, pert::Noise::SumOfGamma,
       [](pert::Op& op, T c_hat, T c, T, T) { return decision_cost(pert::autograd::imle(op, c_hat, 10.0), c); }},
      {"aimle", 10, pert::Noise::SumOfGamma,
       [](pert::Op& op, T c_hat, T c, T, T) { return decision_cost(pert::autograd::aimle(op, c_hat, aimle_state()), c); }},
  };
}

void write_svg(const std::string& path, const std::vector<Curve>& curves, int epochs) {
  FILE* f = std::fopen(path.c_str(), "w");
  if (!f) throw std::runtime_error("cannot write " + path);
  const double W = 760, H = 520, L = 60, R = 170, T = 40, B = 50;
  double top = 0;
  for (auto& c : curves)
    for (double r : c.regret) top = std::max(top, r);
  top = std::max(std::ceil(top * 10) / 10, 0.1);  // a scale even when every regret is 0
  auto px = [&](double e) { return L + (W - L - R) * e / epochs; };
  auto py = [&](double r) { return H - B - (H - T - B) * r / top; };
  std::fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%g\" height=\"%g\" font-family=\"sans-serif\" "
                  "font-size=\"12\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n", W, H);
  std::fprintf(f, "<text x=\"%g\" y=\"24\" font-size=\"15\">Shortest path 5x5: normalized test regret per method "
                  "(solid deg 1, dashed deg 4, dotted deg 6)</text>\n", L);
  std::fprintf(f, "<line x1=\"%g\" y1=\"%g\" x2=\"%g\" y2=\"%g\" stroke=\"black\"/>\n", L, H - B, W - R, H - B);
  std::fprintf(f, "<line x1=\"%g\" y1=\"%g\" x2=\"%g\" y2=\"%g\" stroke=\"black\"/>\n", L, T, L, H - B);
  for (int e = 0; e <= epochs; e += 2)
    std::fprintf(f, "<text x=\"%g\" y=\"%g\" text-anchor=\"middle\">%d</text>\n", px(e), H - B + 16, e);
  for (int k = 0; k <= 5; k++)
    std::fprintf(f, "<text x=\"%g\" y=\"%g\" text-anchor=\"end\">%.2f</text>\n", L - 6, py(top * k / 5) + 4, top * k / 5);
  std::fprintf(f, "<text x=\"%g\" y=\"%g\" text-anchor=\"middle\">epoch</text>\n", (L + W - R) / 2, H - 12);
  std::fprintf(f, "<text x=\"16\" y=\"%g\" text-anchor=\"middle\" transform=\"rotate(-90 16 %g)\">normalized regret</text>\n",
               (T + H - B) / 2, (T + H - B) / 2);
  const char* colours[9] = {"#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666", "#1f78b4"};
  std::vector<std::string> names;
  for (const auto& c : curves)
    if (std::find(names.begin(), names.end(), c.method) == names.end()) names.push_back(c.method);
  for (const auto& c : curves) {
    auto k = static_cast<size_t>(std::find(names.begin(), names.end(), c.method) - names.begin());
    const char* colour = colours[k % 9];
    const char* dash = c.deg == 1 ? "" : c.deg == 4 ? " stroke-dasharray=\"6,4\"" : " stroke-dasharray=\"2,3\"";
    std::fprintf(f, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"1.5\"%s points=\"", colour, dash);
    for (size_t e = 0; e < c.regret.size(); e++) std::fprintf(f, "%g,%g ", px(double(e)), py(c.regret[e]));
    std::fprintf(f, "\"/>\n");
  }
  for (size_t k = 0; k < names.size(); k++)
    std::fprintf(f, "<text x=\"%g\" y=\"%g\" fill=\"%s\">%s</text>\n", W - R + 8, T + 16 + 18 * double(k),
                 colours[k % 9], names[k].c_str());
  std::fprintf(f, "</svg>\n");
  std::fclose(f);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string svg = argc > 1 ? argv[1] : "regret.svg";
  const int epochs = 10, batch = 32;
  std::vector<Curve> curves;
  for (const auto& method : methods()) {
    for (int deg : {1, 4, 6}) {
      std::mt19937 rng(7 + deg);
      std::bernoulli_distribution coin(0.5);
      std::vector<float> b(kEdges * kFeatures);
      for (auto& v : b) v = coin(rng) ? 1.0f : 0.0f;
      Data train = make_data(1000, deg, b, rng);
      Data test = make_data(1000, deg, b, rng);
      torch::manual_seed(0);
      torch::nn::Linear model(kFeatures, kEdges);
      torch::optim::Adam adam(model->parameters(), torch::optim::AdamOptions(0.01));
      pert::Config config;
      aimle_state() = pert_aimle_state_default();
      config.num_samples(method.num_samples).sigma(1.0).noise(method.noise).sense(pert::Sense::Minimize)
          .device("cpu").threads(2);
      pert::Op op(config, {kEdges}, {kEdges}, [](const pert_solve_info&, const float* costs, std::size_t count, float* paths) {
        if (grid_shortest_path(nullptr, costs, count, paths) != 0) throw std::runtime_error("non-finite cost");
      });
      Curve curve{method.name, deg, {regret(model, test)}, 0.0};
      std::printf("%-7s deg %d  epoch  0  test regret %.4f\n", method.name.c_str(), deg, curve.regret.back());
      double seconds = 0;
      for (int epoch = 1; epoch <= epochs; epoch++) {
        auto start = std::chrono::steady_clock::now();
        auto order = torch::randperm(train.x.size(0));
        for (int64_t i = 0; i < train.x.size(0); i += batch) {
          auto idx = order.slice(0, i, std::min<int64_t>(i + batch, train.x.size(0)));
          auto loss = method.loss(op, model->forward(train.x.index_select(0, idx)), train.c.index_select(0, idx),
                                  train.w.index_select(0, idx), train.z.index_select(0, idx))
                          .mean();
          adam.zero_grad();
          loss.backward();
          adam.step();
        }
        seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        curve.regret.push_back(regret(model, test));
        std::printf("%-7s deg %d  epoch %2d  test regret %.4f\n", method.name.c_str(), deg, epoch, curve.regret.back());
      }
      curve.seconds_per_epoch = seconds / epochs;
      curves.push_back(curve);
    }
  }
  std::printf("\nnormalized test regret, untrained -> trained (%d epochs), seconds per epoch:\n", epochs);
  bool learned = true;
  for (auto& c : curves) {
    std::printf("  %-7s deg %d: %.4f -> %.4f  (%.3f s/epoch)\n", c.method.c_str(), c.deg, c.regret.front(),
                c.regret.back(), c.seconds_per_epoch);
    learned = learned && c.regret.back() < c.regret.front();
  }
  write_svg(svg, curves, epochs);
  std::printf("learning curves: %s\n", svg.c_str());
  return learned ? 0 : 1;
}
