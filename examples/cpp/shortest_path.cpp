// The seed's shortest-path example in C++: a Dijkstra solver as a class, used as the
// perturbed op's solver through the C++ wrapper. Dijkstra needs positive costs, so the
// costs are perturbed multiplicatively (theta * exp(sigma Z - sigma^2/2) keeps signs),
// then 30 steps of gradient ascent on four costs raise the weight of edge 6->8.
#include <cstdio>
#include <functional>
#include <limits>
#include <queue>
#include <utility>
#include <vector>

#include "../c/graph.h"
#include "perturbations.hpp"

/// Shortest path from `source` to `target` on a directed graph with positive edge costs;
/// the solution is the 0/1 indicator of the path's edges.
class Dijkstra {
 public:
  Dijkstra(int nodes, std::vector<int> from, std::vector<int> to, int source, int target)
      : nodes_(nodes), from_(std::move(from)), to_(std::move(to)), source_(source), target_(target), out_(nodes) {
    for (std::size_t e = 0; e < from_.size(); e++) out_[from_[e]].push_back(static_cast<int>(e));
  }

  std::size_t edges() const { return from_.size(); }

  /// Solves `count` problems of edges() costs each.
  void operator()(const float* costs, std::size_t count, float* on_path) const {
    for (std::size_t r = 0; r < count; r++) solve(costs + r * edges(), on_path + r * edges());
  }

 private:
  void solve(const float* cost, float* y) const {
    std::vector<double> dist(nodes_, std::numeric_limits<double>::infinity());
    std::vector<int> via(nodes_, -1);
    using Item = std::pair<double, int>;
    std::priority_queue<Item, std::vector<Item>, std::greater<Item>> queue;
    dist[source_] = 0;
    queue.push({0.0, source_});
    while (!queue.empty()) {
      auto [d, v] = queue.top();
      queue.pop();
      if (d > dist[v]) continue;
      for (int e : out_[v]) {
        if (cost[e] <= 0) throw std::domain_error("Dijkstra needs positive costs");
        if (d + cost[e] < dist[to_[e]]) {
          dist[to_[e]] = d + cost[e];
          via[to_[e]] = e;
          queue.push({dist[to_[e]], to_[e]});
        }
      }
    }
    std::fill(y, y + edges(), 0.0f);
    for (int v = target_; v != source_; v = from_[via[v]]) {
      if (via[v] < 0) throw std::runtime_error("target unreachable");
      y[via[v]] = 1.0f;
    }
  }

  int nodes_;
  std::vector<int> from_, to_;
  int source_, target_;
  std::vector<std::vector<int>> out_;
};

int main() {
  Dijkstra dijkstra(NODES, std::vector<int>(FROM, FROM + EDGES), std::vector<int>(TO, TO + EDGES), SOURCE, TARGET);
  pert::Config config;
  config.num_samples(100000).sigma(0.1).perturbation(pert::Perturbation::Multiplicative).threads(0);
  pert::Op op(config, {EDGES}, {EDGES}, std::cref(dijkstra));  // any callable; const, so thread-safe

  std::vector<float> costs(COST, COST + EDGES), g(EDGES, 0.0f);
  g[E68] = 1.0f;
  const int tuned[4] = {E68, E65, E54, E48};
  auto [weights, tape] = op.forward_with_tape(costs, 1);
  std::printf("Perturbed shortest path 0 -> 8 (multiplicative noise, sigma 0.1, N = 1e5, Dijkstra in C++)\n");
  std::printf("  weight of 6->8 before: %.3f\n", weights[E68]);
  for (int step = 1; step <= 30; step++) {
    auto grad = tape.vjp(g);  // d weight(6->8) / d costs
    for (int e : tuned) costs[e] += 0.003f * grad[e];
    auto next = op.forward_with_tape(costs, 1);
    weights = std::move(next.output);
    tape = std::move(next.tape);
  }
  std::printf("  weight of 6->8 after 30 steps of gradient ascent: %.3f (the seed: 0.079 -> 0.989)\n", weights[E68]);
  std::printf("  costs of [6->8, 6->5, 5->4, 4->8]: %.3f %.3f %.3f %.3f\n", costs[E68], costs[E65], costs[E54], costs[E48]);
  return weights[E68] > 0.9f ? 0 : 1;
}
