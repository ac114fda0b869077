/* The two-phase API with the solves spread over MPI ranks: rank 0 draws the perturbed edge
 * costs, every rank solves its share of shortest paths, rank 0 gathers the solutions and
 * finishes the call. The result is compared with the callback path (same seed): equal.
 *
 *   mpicc -std=c11 mpi_two_phase.c -I../../include -L../../target/release -lperturbations \
 *         -Wl,-rpath,../../target/release -lm -o mpi_two_phase
 *   mpirun -np 2 ./mpi_two_phase
 */
#include <mpi.h>

#include "graph.h"

#define N_SAMPLES 20000

static pert_op *make_op(int external) {
  pert_config *config = NULL;
  pert_op *op = NULL;
  const int64_t shape[1] = {EDGES};
  check(pert_config_new(&config), "pert_config_new");
  check(pert_config_set_num_samples(config, N_SAMPLES), "set_num_samples");
  check(pert_config_set_sigma(config, 0.05), "set_sigma");
  check(pert_config_set_device(config, "cpu"), "set_device");
  if (external)
    check(pert_op_new_external(config, shape, 1, shape, 1, &op), "pert_op_new_external");
  else
    check(pert_op_new(config, shape, 1, shape, 1, shortest_path, NULL, &op), "pert_op_new");
  pert_config_free(config);
  return op;
}

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  int rank, size;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);

  pert_op *op = NULL;
  pert_draw *draw = NULL;
  unsigned long long count = 0;
  if (rank == 0) {
    op = make_op(1);
    check(pert_draw_new(op, COST, 1, &draw), "pert_draw_new");
    count = pert_draw_count(draw);
  }
  MPI_Bcast(&count, 1, MPI_UNSIGNED_LONG_LONG, 0, MPI_COMM_WORLD);

  /* rows [start[r], start[r] + rows[r]) go to rank r */
  int *counts = malloc(size * sizeof *counts), *displs = malloc(size * sizeof *displs);
  for (int r = 0, at = 0; r < size; r++) {
    int rows = (int)(count / size + ((unsigned long long)r < count % size));
    counts[r] = rows * EDGES, displs[r] = at * EDGES, at += rows;
  }
  float *mine = malloc(counts[rank] * sizeof *mine), *solved = malloc(counts[rank] * sizeof *solved);
  MPI_Scatterv(rank == 0 ? pert_draw_inputs(draw) : NULL, counts, displs, MPI_FLOAT, mine, counts[rank], MPI_FLOAT, 0,
               MPI_COMM_WORLD);
  if (shortest_path(NULL, mine, counts[rank] / EDGES, solved) != 0) MPI_Abort(MPI_COMM_WORLD, 1);
  float *solutions = rank == 0 ? malloc(count * EDGES * sizeof *solutions) : NULL;
  MPI_Gatherv(solved, counts[rank], MPI_FLOAT, solutions, counts, displs, MPI_FLOAT, 0, MPI_COMM_WORLD);

  int status = 0;
  if (rank == 0) {
    float weights[EDGES], grad[EDGES], g[EDGES] = {0};
    g[E68] = 1.0f;
    pert_tape *tape = NULL;
    check(pert_draw_finish(draw, solutions, weights, &tape), "pert_draw_finish");
    check(pert_tape_vjp(tape, g, grad), "pert_tape_vjp");

    pert_op *callback = make_op(0); /* the same seed and call count: the same draws */
    float weights_cb[EDGES], grad_cb[EDGES];
    pert_tape *tape_cb = NULL;
    check(pert_forward(callback, COST, 1, weights_cb, &tape_cb), "pert_forward");
    check(pert_tape_vjp(tape_cb, g, grad_cb), "pert_tape_vjp");
    int same = memcmp(weights, weights_cb, sizeof weights) == 0 && memcmp(grad, grad_cb, sizeof grad) == 0;
    printf("%d ranks solved %llu perturbed shortest paths\n", size, count);
    printf("weight of 6->8: %.4f (callback path: %.4f); d/d cost(6->8): %.3f (callback path: %.3f)\n", weights[E68],
           weights_cb[E68], grad[E68], grad_cb[E68]);
    printf("two-phase over MPI %s the callback path\n", same ? "equals" : "DIFFERS FROM");
    status = !same;
    pert_tape_free(tape);
    pert_tape_free(tape_cb);
    pert_op_free(callback);
    pert_draw_free(draw);
    pert_op_free(op);
    free(solutions);
  }
  free(mine);
  free(solved);
  free(counts);
  free(displs);
  MPI_Bcast(&status, 1, MPI_INT, 0, MPI_COMM_WORLD);
  MPI_Finalize();
  return status;
}
