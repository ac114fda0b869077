/* The seed's walkthrough in C: perturbed argmax vs softmax (unbatched and batched),
 * its gradient vs the softmax gradient, and the perturbed OR vs its closed form.
 * Every number is printed beside its closed-form value.
 *
 *   cc -std=c11 seed_walkthrough.c -I../../include -L../../target/release \
 *      -lperturbations -Wl,-rpath,../../target/release -lm
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "perturbations.h"

#define D 5

/* Exits with the library's message when a call fails. */
static void check(pert_status status, const char *what) {
  if (status != PERT_STATUS_OK) {
    char msg[512];
    pert_last_error(msg, sizeof msg);
    fprintf(stderr, "%s failed: %s: %s\n", what, pert_status_name(status), msg);
    exit(1);
  }
}

/* The solver: one-hot argmax of each row (user_data: the row length). */
static int32_t argmax(void *user_data, const float *x, size_t count, float *y) {
  size_t d = *(const size_t *)user_data;
  for (size_t r = 0; r < count; r++) {
    size_t best = 0;
    for (size_t i = 1; i < d; i++)
      if (x[r * d + i] > x[r * d + best]) best = i;
    for (size_t i = 0; i < d; i++) y[r * d + i] = (float)(i == best);
  }
  return 0;
}

/* OR over the signs of a row: 1 if any entry > 0, else -1. */
static int32_t hard_or(void *user_data, const float *x, size_t count, float *y) {
  size_t d = *(const size_t *)user_data;
  for (size_t r = 0; r < count; r++) {
    int any = 0;
    for (size_t i = 0; i < d; i++) any |= x[r * d + i] > 0;
    y[r] = any ? 1.0f : -1.0f;
  }
  return 0;
}

static void softmax(const float *theta, double sigma, double *p) {
  double z = 0;
  for (int i = 0; i < D; i++) z += p[i] = exp(theta[i] / sigma);
  for (int i = 0; i < D; i++) p[i] /= z;
}

static void print_pair(const char *label, const float *got, const double *want, int n) {
  printf("  %-12s", label);
  for (int i = 0; i < n; i++) printf(" %8.4f", got[i]);
  printf("\n  %-12s", "closed form");
  for (int i = 0; i < n; i++) printf(" %8.4f", want[i]);
  printf("\n");
}

int main(void) {
  const double sigma = 0.5;
  size_t d = D;
  const int64_t shape[1] = {D};
  pert_config *config = NULL;
  check(pert_config_new(&config), "pert_config_new");
  check(pert_config_set_num_samples(config, 1000000), "set_num_samples");
  check(pert_config_set_sigma(config, sigma), "set_sigma");
  check(pert_config_set_noise(config, PERT_NOISE_GUMBEL), "set_noise");
  pert_op *op = NULL;
  check(pert_op_new(config, shape, 1, shape, 1, argmax, &d, &op), "pert_op_new");

  printf("perturbations %s: the seed walkthrough (Gumbel noise, sigma 0.5, N = 1e6)\n\n", pert_version());
  const float theta[D] = {-0.6f, 1.9f, -0.2f, 1.1f, -1.0f};
  float y[2 * D];
  double p[2 * D];
  check(pert_forward(op, theta, 1, y, NULL), "pert_forward");
  softmax(theta, sigma, p);
  printf("Perturbed argmax of theta = [-0.6, 1.9, -0.2, 1.1, -1.0] vs softmax(theta / sigma):\n");
  print_pair("perturbed", y, p, D);

  const float batch[2 * D] = {-0.6f, 1.9f, -0.2f, 1.1f, -1.0f, -0.6f, 1.0f, -0.2f, 1.8f, -1.0f};
  pert_tape *tape = NULL;
  check(pert_forward(op, batch, 2, y, &tape), "pert_forward");
  softmax(batch, sigma, p);
  softmax(batch + D, sigma, p + D);
  printf("\nBatched, theta = [[-0.6, 1.9, -0.2, 1.1, -1.0], [-0.6, 1.0, -0.2, 1.8, -1.0]]:\n");
  print_pair("perturbed[0]", y, p, D);
  print_pair("perturbed[1]", y + D, p + D, D);

  /* Gradient of ||y||_F with respect to theta: J^T (y / ||y||), from the tape; the
   * softmax's is (diag p - p p^T) / sigma applied to p / ||p||. */
  double norm_y = 0, norm_p = 0;
  for (int i = 0; i < 2 * D; i++) norm_y += (double)y[i] * y[i], norm_p += p[i] * p[i];
  float g[2 * D], grad[2 * D];
  for (int i = 0; i < 2 * D; i++) g[i] = (float)(y[i] / sqrt(norm_y));
  check(pert_tape_vjp(tape, g, grad), "pert_tape_vjp");
  double grad_soft[2 * D];
  for (int b = 0; b < 2; b++) {
    const double *pb = p + b * D;
    double dot = 0;
    for (int i = 0; i < D; i++) dot += pb[i] * pb[i] / sqrt(norm_p);
    for (int i = 0; i < D; i++) grad_soft[b * D + i] = pb[i] * (pb[i] / sqrt(norm_p) - dot) / sigma;
  }
  printf("\nGradient of ||y|| with respect to theta (VJP from the tape) vs the softmax's:\n");
  print_pair("grad[0]", grad, grad_soft, D);
  print_pair("grad[1]", grad + D, grad_soft + D, D);
  pert_tape_free(tape);
  pert_op_free(op);

  /* The perturbed OR: E = 1 - 2 prod_i exp(-exp(theta_i / sigma)). */
  const double sigma_or = 0.1;
  size_t two = 2;
  check(pert_config_set_sigma(config, sigma_or), "set_sigma");
  check(pert_config_set_num_samples(config, 100000), "set_num_samples");
  const int64_t or_shape[1] = {2};
  check(pert_op_new(config, or_shape, 1, NULL, 0, hard_or, &two, &op), "pert_op_new");
  const float theta_or[4] = {-5.0f, 0.2f, -5.0f, 0.1f};
  float y_or[2];
  check(pert_forward(op, theta_or, 2, y_or, NULL), "pert_forward");
  double want_or[2];
  for (int b = 0; b < 2; b++)
    want_or[b] = 1 - 2 * exp(-exp(theta_or[2 * b] / sigma_or)) * exp(-exp(theta_or[2 * b + 1] / sigma_or));
  printf("\nPerturbed OR of [[-5, 0.2], [-5, 0.1]] (Gumbel, sigma 0.1, N = 1e5); hard OR gives [1, 1]:\n");
  print_pair("perturbed", y_or, want_or, 2);
  pert_op_free(op);
  pert_config_free(config);
  return 0;
}
