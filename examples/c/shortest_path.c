/* The seed's shortest-path example in C: a 9-node directed graph, a shortest-path solver
 * as the callback (Normal noise on the edge costs, sigma 0.05, N = 1e5), the gradient of
 * the solution's weight on edge 6->8 with respect to four edge costs, then 30 steps of
 * gradient ascent on those costs that raise that weight. Writes SVG pictures of the
 * perturbed solution before and after into the folder given as argv[1] (default ".").
 *
 * Every path from 0 to 8 crosses node 6 (the route through node 1 costs 0.7 more, far
 * beyond the noise), where it takes either 6->8 or 6->5->4->8, so the weight of 6->8 has
 * the closed form Phi((c65 + c54 + c48 - c68) / (2 sigma)), printed beside the estimate.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "graph.h"

static const int TUNED[4] = {E68, E65, E54, E48};
static const double X[NODES] = {60, 220, 200, 200, 640, 520, 420, 320, 760};
static const double Y[NODES] = {220, 380, 100, 220, 330, 330, 160, 160, 220};

static double normal_cdf(double x) { return 0.5 * erfc(-x / sqrt(2.0)); }

static double closed_form_weight(const float *c, double sigma) {
  return normal_cdf((c[E65] + c[E54] + c[E48] - c[E68]) / (2 * sigma));
}

static void write_svg(const char *dir, const char *name, const float *costs, const float *weights, const char *title) {
  char path[1024];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  FILE *f = fopen(path, "w");
  if (!f) {
    perror(path);
    exit(1);
  }
  fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"820\" height=\"440\" font-family=\"sans-serif\">\n");
  fprintf(f, "<defs><marker id=\"a\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"5\" markerHeight=\"5\" orient=\"auto\">"
             "<path d=\"M0,0 L10,5 L0,10 z\" fill=\"#555\"/></marker></defs>\n");
  fprintf(f, "<rect width=\"820\" height=\"440\" fill=\"white\"/>\n<text x=\"20\" y=\"30\" font-size=\"16\">%s</text>\n", title);
  for (int e = 0; e < EDGES; e++) {
    double x0 = X[FROM[e]], y0 = Y[FROM[e]], x1 = X[TO[e]], y1 = Y[TO[e]];
    double len = hypot(x1 - x0, y1 - y0), ux = (x1 - x0) / len, uy = (y1 - y0) / len;
    x0 += 18 * ux, y0 += 18 * uy, x1 -= 18 * ux, y1 -= 18 * uy;
    fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\" stroke-width=\"1.5\" marker-end=\"url(#a)\"/>\n",
            x0, y0, x1, y1);
    if (weights[e] > 0.001f)
      fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#c0392b\" stroke-opacity=\"0.8\" stroke-width=\"%.2f\"/>\n",
              x0, y0, x1, y1, 14.0 * weights[e]);
    fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"12\" fill=\"#333\">%.2f</text>\n", (x0 + x1) / 2 + 6,
            (y0 + y1) / 2 - 6, costs[e]);
  }
  for (int v = 0; v < NODES; v++)
    fprintf(f, "<circle cx=\"%.0f\" cy=\"%.0f\" r=\"16\" fill=\"#2c3e50\"/><text x=\"%.0f\" y=\"%.0f\" font-size=\"14\" fill=\"white\" text-anchor=\"middle\">%d</text>\n",
            X[v], Y[v], X[v], Y[v] + 5, v);
  fprintf(f, "</svg>\n");
  fclose(f);
  printf("  wrote %s\n", path);
}

int main(int argc, char **argv) {
  const char *dir = argc > 1 ? argv[1] : ".";
  const double sigma = 0.05;
  pert_config *config = NULL;
  check(pert_config_new(&config), "pert_config_new");
  check(pert_config_set_num_samples(config, 100000), "set_num_samples");
  check(pert_config_set_sigma(config, sigma), "set_sigma");
  check(pert_config_set_noise(config, PERT_NOISE_NORMAL), "set_noise");
  check(pert_config_set_threads(config, 0), "set_threads"); /* the solver is thread-safe */
  const int64_t shape[1] = {EDGES};
  pert_op *op = NULL;
  check(pert_op_new(config, shape, 1, shape, 1, shortest_path, NULL, &op), "pert_op_new");
  pert_config_free(config);

  float costs[EDGES], weights[EDGES], grad[EDGES], g[EDGES] = {0};
  memcpy(costs, COST, sizeof costs);
  g[E68] = 1.0f; /* d weight(6->8) / d costs = J^T e_(6->8) */

  printf("Perturbed shortest path 0 -> 8 (Normal noise, sigma 0.05, N = 1e5)\n");
  pert_tape *tape = NULL;
  check(pert_forward(op, costs, 1, weights, &tape), "pert_forward");
  check(pert_tape_vjp(tape, g, grad), "pert_tape_vjp");
  pert_tape_free(tape);
  printf("  edge weights:");
  for (int e = 0; e < EDGES; e++) printf(" %d->%d:%.3f", FROM[e], TO[e], weights[e]);
  printf("\n  weight of 6->8: %.4f   closed form: %.4f   (the seed's graph: 0.079)\n", weights[E68],
         closed_form_weight(costs, sigma));
  double phi = exp(-0.5 * pow((costs[E65] + costs[E54] + costs[E48] - costs[E68]) / (2 * sigma), 2)) / sqrt(2 * 3.14159265358979323846);
  printf("  gradient w.r.t. costs of [6->8, 6->5, 5->4, 4->8]: [%.3f, %.3f, %.3f, %.3f]\n", grad[E68], grad[E65],
         grad[E54], grad[E48]);
  printf("  closed form:                                       [%.3f, %.3f, %.3f, %.3f]   (the seed's: [-2.099, 2.076, 2.042, 2.041])\n",
         -phi / (2 * sigma), phi / (2 * sigma), phi / (2 * sigma), phi / (2 * sigma));
  write_svg(dir, "shortest_path_before.svg", costs, weights, "Perturbed shortest path, before gradient ascent");

  const double step = 0.003;
  printf("\n30 steps of gradient ascent on the four costs (step %.3f) to raise the weight of 6->8:\n", step);
  for (int it = 1; it <= 30; it++) {
    for (int k = 0; k < 4; k++) costs[TUNED[k]] += (float)(step * grad[TUNED[k]]);
    check(pert_forward(op, costs, 1, weights, &tape), "pert_forward");
    check(pert_tape_vjp(tape, g, grad), "pert_tape_vjp");
    pert_tape_free(tape);
    if (it % 5 == 0)
      printf("  step %2d: costs [%.3f, %.3f, %.3f, %.3f]  weight %.4f  closed form %.4f\n", it, costs[E68], costs[E65],
             costs[E54], costs[E48], weights[E68], closed_form_weight(costs, sigma));
  }
  printf("  weight of 6->8: %.3f -> %.3f   (the seed: 0.079 -> 0.989)\n", closed_form_weight(COST, sigma), weights[E68]);
  write_svg(dir, "shortest_path_after.svg", costs, weights, "Perturbed shortest path, after 30 steps of gradient ascent");
  pert_op_free(op);
  return 0;
}
