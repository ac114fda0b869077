/* A consumer of the installed MPI component: an op over every rank, one call, equal to the
 * same op in one process (mpirun -np 2). */
#include <stdio.h>
#include <string.h>

#include <perturbations_mpi.h>

static int32_t argmax(void *user_data, const pert_solve_info *info, const float *x, size_t count, float *y) {
  (void)user_data, (void)info;
  for (size_t r = 0; r < count; r++) {
    size_t best = 0;
    for (size_t i = 1; i < 4; i++)
      if (x[r * 4 + i] > x[r * 4 + best]) best = i;
    for (size_t i = 0; i < 4; i++) y[r * 4 + i] = i == best;
  }
  return 0;
}

int main(int argc, char **argv) {
  int provided = 0, rank = 0, ok = 1;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_SERIALIZED, &provided);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  pert_config *c = NULL;
  pert_config_new(&c);
  pert_config_set_num_samples(c, 100);
  pert_config_set_device(c, "cpu");
  const int64_t shape[1] = {4};
  pert_op *op = NULL, *alone = NULL;
  ok = pert_mpi_op_new(c, shape, 1, shape, 1, MPI_COMM_WORLD, 0, argmax, NULL, NULL, NULL, &op) == PERT_STATUS_OK;
  if (ok && rank == 0) {
    const float theta[4] = {0.1f, 0.3f, 0.2f, 0.25f};
    float y[4], want[4];
    ok = pert_op_new_ex(c, shape, 1, shape, 1, argmax, NULL, NULL, NULL, &alone) == PERT_STATUS_OK &&
         pert_forward(op, theta, 1, y, NULL) == PERT_STATUS_OK &&
         pert_forward(alone, theta, 1, want, NULL) == PERT_STATUS_OK && memcmp(y, want, sizeof y) == 0;
    printf("installed MPI component: y = [%.2f %.2f %.2f %.2f] %s\n", y[0], y[1], y[2], y[3],
           ok ? "(equal to one process)" : "FAILED");
    pert_op_free(alone);
    pert_op_free(op);
  } else if (ok) {
    ok = pert_mpi_serve(op) == PERT_STATUS_OK;
    pert_op_free(op);
  }
  pert_config_free(c);
  MPI_Finalize();
  return !ok;
}
