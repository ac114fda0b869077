/* The knapsack training of bench/pool_knapsack.c and examples/c/mpi_knapsack.c: a linear
 * model of P features predicts the item values of 0-1 knapsacks (examples/c/glpk_knapsack.h),
 * trained with the Fenchel-Young loss and Adam; data in the spirit of PyEPO's knapsack
 * generator, the test regret by an exact DP. */
#ifndef PERT_KNAPSACK_TRAINING_H
#define PERT_KNAPSACK_TRAINING_H

#include <math.h>
#include <string.h>

#include "glpk_knapsack.h"

enum { P = 5, TRAIN = 200, TEST = 100, BATCH = 20 };

static double value(const float *c, const float *x) {
  double s = 0;
  for (int j = 0; j < ITEMS; j++) s += (double)c[j] * x[j];
  return s;
}

static unsigned long long rng_state = 88172645463325252ULL;
static double uniform(void) {
  rng_state ^= rng_state << 13, rng_state ^= rng_state >> 7, rng_state ^= rng_state << 17;
  return ((double)(rng_state >> 11) + 0.5) / 9007199254740992.0;
}
static double normal(void) { return sqrt(-2 * log(uniform())) * cos(6.283185307179586 * uniform()); }

/* Data: PyEPO's knapsack generator in spirit: values ((B x)/sqrt(P) + 3)^4 / 3.5^4 + 0.5,
 * with multiplicative noise in [0.75, 1.25]. */
static float feat[TRAIN + TEST][P], cost[TRAIN + TEST][ITEMS], sol[TRAIN + TEST][ITEMS];

static void make_data(void) {
  double b[ITEMS][P];
  for (int j = 0; j < ITEMS; j++)
    for (int k = 0; k < P; k++) b[j][k] = uniform() < 0.5 ? 1.0 : 0.0;
  for (int i = 0; i < TRAIN + TEST; i++) {
    for (int k = 0; k < P; k++) feat[i][k] = (float)normal();
    for (int j = 0; j < ITEMS; j++) {
      double s = 0;
      for (int k = 0; k < P; k++) s += b[j][k] * feat[i][k];
      double v = pow(s / sqrt((double)P) + 3.0, 4) / pow(3.5, 4) + 0.5;
      cost[i][j] = (float)(v * (0.75 + 0.5 * uniform()));
    }
    solve_dp(NULL, cost[i], 1, sol[i]);
  }
}

/* The model (w, bias) and Adam's moments. */
typedef struct {
  float w[ITEMS][P], bias[ITEMS], mw[ITEMS][P], vw[ITEMS][P], mb[ITEMS], vb[ITEMS];
  int step;
} model;

/* The test regret of a model. */
static double regret(const model *m) {
  double lost = 0, best = 0;
  for (int i = TRAIN; i < TRAIN + TEST; i++) {
    float pred[ITEMS], x[ITEMS];
    for (int j = 0; j < ITEMS; j++) {
      double s = m->bias[j];
      for (int k = 0; k < P; k++) s += m->w[j][k] * feat[i][k];
      pred[j] = (float)s;
    }
    solve_dp(NULL, pred, 1, x);
    double opt = value(cost[i], sol[i]);
    lost += opt - value(cost[i], x);
    best += opt;
  }
  return lost / best;
}

/* The predicted values of instances [s, s + BATCH). */
static void predict(const model *m, int s, float theta[BATCH][ITEMS]) {
  for (int i = 0; i < BATCH; i++)
    for (int j = 0; j < ITEMS; j++) {
      double v = m->bias[j];
      for (int k = 0; k < P; k++) v += m->w[j][k] * feat[s + i][k];
      theta[i][j] = (float)v;
    }
}

/* One Adam step (learning rate 0.05) from the loss's gradient at instances [s, s + BATCH). */
static void adam_step(model *m, int s, float grad[BATCH][ITEMS]) {
  m->step++;
  const double lr = 0.05, b1 = 0.9, b2 = 0.999, c1 = 1 - pow(b1, m->step), c2 = 1 - pow(b2, m->step);
  for (int j = 0; j < ITEMS; j++) {
    double gb = 0, gw[P] = {0};
    for (int i = 0; i < BATCH; i++) {
      gb += grad[i][j] / BATCH;
      for (int k = 0; k < P; k++) gw[k] += grad[i][j] * feat[s + i][k] / BATCH;
    }
    m->mb[j] = (float)(b1 * m->mb[j] + (1 - b1) * gb), m->vb[j] = (float)(b2 * m->vb[j] + (1 - b2) * gb * gb);
    m->bias[j] -= (float)(lr * (m->mb[j] / c1) / (sqrt(m->vb[j] / c2) + 1e-8));
    for (int k = 0; k < P; k++) {
      m->mw[j][k] = (float)(b1 * m->mw[j][k] + (1 - b1) * gw[k]);
      m->vw[j][k] = (float)(b2 * m->vw[j][k] + (1 - b2) * gw[k] * gw[k]);
      m->w[j][k] -= (float)(lr * (m->mw[j][k] / c1) / (sqrt(m->vw[j][k] / c2) + 1e-8));
    }
  }
}

#endif
