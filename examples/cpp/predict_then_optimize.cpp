// Predict-then-optimize on the standard synthetic shortest-path benchmark of
// decision-focused learning, in libtorch C++: a linear model (5 features -> 40 edge costs)
// trained through the Fenchel-Young loss of a perturbed shortest-path solver.
//
// Data: a 5x5 grid (40 edges that move right or down, top-left to bottom-right), features
// x ~ N(0, I_5), costs c_j = [(1/3.5^deg) ((B x)_j / sqrt(5) + 3)^deg + 1] * eps_j with
// B a fixed Bernoulli(0.5) 40x5 matrix and eps_j ~ U[0.5, 1.5]; 1000 training and 1000 test
// instances, for deg = 1, 4, 6. Training: minimization sense, Normal noise, sigma 1,
// N = 1 and N = 10 (default settings otherwise: N = 1 uses the plain estimator), Adam
// (lr 0.01), batch 32, 10 epochs. The solver is the dynamic program of
// examples/c/grid_shortest_path.c, run by pert_op_new_ex on 2 persistent workers.
//
// Printed per epoch: the test set's normalized regret
//     sum_i (c_i . w(c^_i) - c_i . w*(c_i)) / sum_i c_i . w*(c_i),
// written: the learning curves as an SVG (argv[1], default "regret.svg").
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
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
  torch::Tensor x, c, w;  // features [n, 5], costs [n, 40], optimal paths [n, 40]
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
  return Data{x, c, solve_all(c)};
}

double regret(torch::nn::Linear& model, const Data& test) {
  torch::NoGradGuard no_grad;
  auto w_hat = solve_all(model->forward(test.x));
  auto chosen = (test.c * w_hat).sum();
  auto best = (test.c * test.w).sum();
  return ((chosen - best) / best).item<double>();
}

struct Curve {
  int deg, n;
  std::vector<double> regret;
};

void write_svg(const std::string& path, const std::vector<Curve>& curves, int epochs) {
  FILE* f = std::fopen(path.c_str(), "w");
  if (!f) throw std::runtime_error("cannot write " + path);
  const double W = 640, H = 400, L = 60, R = 150, T = 40, B = 50;
  double top = 0;
  for (auto& c : curves)
    for (double r : c.regret) top = std::max(top, r);
  top = std::max(std::ceil(top * 10) / 10, 0.1);  // a scale even when every regret is 0
  auto px = [&](double e) { return L + (W - L - R) * e / epochs; };
  auto py = [&](double r) { return H - B - (H - T - B) * r / top; };
  std::fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%g\" height=\"%g\" font-family=\"sans-serif\" "
                  "font-size=\"12\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n", W, H);
  std::fprintf(f, "<text x=\"%g\" y=\"24\" font-size=\"15\">Shortest path 5x5: normalized test regret, Fenchel-Young "
                  "loss</text>\n", L);
  std::fprintf(f, "<line x1=\"%g\" y1=\"%g\" x2=\"%g\" y2=\"%g\" stroke=\"black\"/>\n", L, H - B, W - R, H - B);
  std::fprintf(f, "<line x1=\"%g\" y1=\"%g\" x2=\"%g\" y2=\"%g\" stroke=\"black\"/>\n", L, T, L, H - B);
  for (int e = 0; e <= epochs; e += 2)
    std::fprintf(f, "<text x=\"%g\" y=\"%g\" text-anchor=\"middle\">%d</text>\n", px(e), H - B + 16, e);
  for (int k = 0; k <= 5; k++)
    std::fprintf(f, "<text x=\"%g\" y=\"%g\" text-anchor=\"end\">%.2f</text>\n", L - 6, py(top * k / 5) + 4, top * k / 5);
  std::fprintf(f, "<text x=\"%g\" y=\"%g\" text-anchor=\"middle\">epoch</text>\n", (L + W - R) / 2, H - 12);
  std::fprintf(f, "<text x=\"16\" y=\"%g\" text-anchor=\"middle\" transform=\"rotate(-90 16 %g)\">normalized regret</text>\n",
               (T + H - B) / 2, (T + H - B) / 2);
  const char* colours[3] = {"#1b9e77", "#d95f02", "#7570b3"};
  for (size_t i = 0; i < curves.size(); i++) {
    const auto& c = curves[i];
    const char* colour = colours[(c.deg == 1 ? 0 : c.deg == 4 ? 1 : 2)];
    std::fprintf(f, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"2\"%s points=\"", colour,
                 c.n == 1 ? " stroke-dasharray=\"6,4\"" : "");
    for (size_t e = 0; e < c.regret.size(); e++) std::fprintf(f, "%g,%g ", px(double(e)), py(c.regret[e]));
    std::fprintf(f, "\"/>\n<text x=\"%g\" y=\"%g\" fill=\"%s\">deg %d, N = %d</text>\n", W - R + 8, T + 16 + 18 * double(i),
                 colour, c.deg, c.n);
  }
  std::fprintf(f, "</svg>\n");
  std::fclose(f);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string svg = argc > 1 ? argv[1] : "regret.svg";
  const int epochs = 10, batch = 32;
  std::vector<Curve> curves;
  for (int deg : {1, 4, 6}) {
    std::mt19937 rng(7 + deg);
    std::bernoulli_distribution coin(0.5);
    std::vector<float> b(kEdges * kFeatures);
    for (auto& v : b) v = coin(rng) ? 1.0f : 0.0f;
    Data train = make_data(1000, deg, b, rng);
    Data test = make_data(1000, deg, b, rng);
    for (int n : {1, 10}) {
      torch::manual_seed(0);
      torch::nn::Linear model(kFeatures, kEdges);
      torch::optim::Adam adam(model->parameters(), torch::optim::AdamOptions(0.01));
      pert::Config config;
      config.num_samples(n).sigma(1.0).noise(pert::Noise::Normal).sense(pert::Sense::Minimize).device("cpu").threads(2);
      pert::Op op(config, {kEdges}, {kEdges}, [](const pert_solve_info&, const float* costs, std::size_t count, float* paths) {
        if (grid_shortest_path(nullptr, costs, count, paths) != 0) throw std::runtime_error("non-finite cost");
      });
      Curve curve{deg, n, {regret(model, test)}};
      std::printf("deg %d N %2d  epoch  0  test regret %.4f\n", deg, n, curve.regret.back());
      for (int epoch = 1; epoch <= epochs; epoch++) {
        auto order = torch::randperm(train.x.size(0));
        for (int64_t i = 0; i < train.x.size(0); i += batch) {
          auto idx = order.slice(0, i, std::min<int64_t>(i + batch, train.x.size(0)));
          auto loss = pert::autograd::fenchel_young(op, model->forward(train.x.index_select(0, idx)),
                                                    train.w.index_select(0, idx))
                          .mean();
          adam.zero_grad();
          loss.backward();
          adam.step();
        }
        curve.regret.push_back(regret(model, test));
        std::printf("deg %d N %2d  epoch %2d  test regret %.4f\n", deg, n, epoch, curve.regret.back());
      }
      curves.push_back(curve);
    }
  }
  std::printf("\nnormalized test regret, untrained -> trained (%d epochs):\n", epochs);
  bool learned = true;
  for (auto& c : curves) {
    std::printf("  deg %d  N %2d: %.4f -> %.4f\n", c.deg, c.n, c.regret.front(), c.regret.back());
    learned = learned && c.regret.back() < c.regret.front();
  }
  write_svg(svg, curves, epochs);
  std::printf("learning curves: %s\n", svg.c_str());
  return learned ? 0 : 1;
}
