/* A program that links the installed library: perturbed argmax of one problem. */
#include <stdio.h>

#include "perturbations.h"

int main(void) {
  pert_config *config = NULL;
  pert_op *op = NULL;
  const int64_t shape[1] = {3};
  const float theta[3] = {0.1f, 0.9f, 0.3f};
  float y[3];
  pert_status s = pert_config_new(&config);
  if (s == PERT_STATUS_OK) s = pert_config_set_device(config, "cpu");
  if (s == PERT_STATUS_OK) s = pert_op_new_builtin(config, PERT_BUILTIN_ARGMAX, 0, shape, 1, &op);
  if (s == PERT_STATUS_OK) s = pert_forward(op, theta, 1, y, NULL);
  pert_op_free(op);
  pert_config_free(config);
  if (s != PERT_STATUS_OK) return 1;
  printf("perturbations %s: y = [%.3f %.3f %.3f]\n", pert_version(), y[0], y[1], y[2]);
  return y[0] + y[1] + y[2] > 0.999f && y[0] + y[1] + y[2] < 1.001f ? 0 : 1;
}
