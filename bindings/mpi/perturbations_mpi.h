/*
 * perturbations MPI component: the solves of one call spread over an MPI job.
 *
 * A training process makes an op on root as usual, and every other rank of the job lends
 * it its solver: the perturbed rows of each call are handed out in blocks, dynamically,
 * to root's own workers and to the other ranks, whose results come back into the call.
 * On root the op is an ordinary pert_op (pert_forward, tapes, pert_fenchel_young, draws,
 * pert_op_solve, pools, the methods): its results are bit for bit those of the same op in
 * one process, for any number of ranks and threads. Two differences: each rank solves its
 * blocks with pert_op_solve, which refuses rows that are not finite, so a call whose
 * theta + sigma Z overflows float32 (theta or sigma near its limit; one process hands the
 * solver +-inf) fails with PERT_STATUS_SOLVER_FAILED naming the rows; and the solver
 * calls of an op with a pool get no `pool_best` (warm starts; the answers from the pool
 * and the results are the same).
 *
 * Build: compiled against your MPI (implementations are not ABI-compatible): `make mpi`
 * in the repository, the CMake target perturbations::mpi (find_package(perturbations
 * COMPONENTS mpi)), or pkg-config perturbations-mpi; link libperturbations_mpi and
 * libperturbations.
 *
 * Threads: MPI must be initialized with MPI_Init_thread and at least
 * MPI_THREAD_SERIALIZED on every rank (on root the op's own worker thread makes its MPI
 * calls; a serving rank may serve several ops on several threads). The
 * component makes its MPI calls one at a time in the process (several ops, several threads
 * in pert_mpi_serve), so SERIALIZED is enough for it; a program that calls MPI itself
 * while an op's call runs on another thread needs MPI_THREAD_MULTIPLE.
 * The library communicates on its own duplicate of the communicator, with MPI_ERRORS_RETURN:
 * MPI errors become statuses, never an abort.
 *
 * Usage, on every rank:
 *
 *   pert_op *op;
 *   pert_mpi_op_new(config, in_shape, 1, out_shape, 1, MPI_COMM_WORLD, 0, solver, data, init, fini, &op);
 *   if (rank == 0) { ...train with op...; pert_op_free(op); }   // ends the service
 *   else { pert_mpi_serve(op); pert_op_free(op); }
 */
#ifndef PERTURBATIONS_MPI_H
#define PERTURBATIONS_MPI_H

#include <mpi.h>

#include "perturbations.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 Makes an op whose solves are spread over the ranks of `comm`: collective, called by every
 rank of `comm` with the same settings (the config's, but for its threads, max_threads,
 device, chunk_bytes, max_tape_bytes and remote_timeout, which are each rank's own or
 root's alone) and shapes.

 - On `root`, `*out` is an ordinary op (as made by pert_op_new_ex). Each solver call of
   it (a chunk of a forward call's perturbed rows, or of a plain solve) is cut into blocks
   handed out as ranks ask for them: root's own workers and every other rank take blocks
   until none is left, so uneven solve times balance. Block sizes shrink as the call's
   rows run out (each about the rows left / (2 * all threads), times the rank's threads).
   pert_op_free(op) on root ends the service of every other rank.
 - On every other rank, `*out` is the handle to pass to pert_mpi_serve, which solves
   blocks until root's op is freed; then free it with pert_op_free (which runs `fini`).
   Outside pert_mpi_serve it is an ordinary op of `solver` on that rank's workers.

 Each rank solves with `threads` persistent workers of its own (its config's; 0: one per
 core): `init(user_data, w)` runs once on worker w before its first solve, `fini` at
 pert_op_free, as for pert_op_new_ex. The solve info's `first_row`, `clean`, `batch` and
 `num_samples` are those of root's call (global problem and sample indices); `worker` is
 the rank's own worker index.

 Failures: a solver failure on any rank (root's own included) fails root's call with
 PERT_STATUS_SOLVER_FAILED, whose message names the rank, the rows and the solver's
 message. A rank that does not answer a block in time fails the call the same way, naming
 the rank: the config's remote_timeout (pert_config_set_remote_timeout; default 60 s) is
 per row of a worker, so a block of r rows on a rank of t workers has remote_timeout *
 ceil(r / t) seconds from when the rank could start on it (blocks hold at most 32 rows
 per worker). Later calls go on without that rank until it answers (its late answers are
 dropped). No call hangs on a dead or stuck rank, and a failed call writes nothing. (A
 process that dies usually ends the whole job: that is MPI's doing.)

 Interrupts: pert_op_interrupt on root's op takes effect once the solves of the chunk
 being spread have returned (a solver call is never cut short).

 Order: free every op of the component (root's first, which ends the service) before
 MPI_Finalize; a serving rank's pert_mpi_serve returns once root's op is freed (and at
 once when called again afterwards). When a rank has not acknowledged the end of the
 service within min(remote_timeout, 5) + 1 seconds of root's pert_op_free (it was stuck,
 busy, or not serving yet), root keeps the op's duplicate communicator allocated (a
 handle), so that the rank's late messages cannot reach a later communicator.

 @param comm   An intracommunicator; the library works on a duplicate of it (MPI_Comm_dup,
               collective).
 @param root   The rank of `comm` that gets the op; the same on every rank.
 @return on every rank the same status: PERT_STATUS_INVALID_ARGUMENT when MPI is not
         initialized, root is out of range, a rank's MPI thread level is below
         MPI_THREAD_SERIALIZED, or a rank's settings or shapes differ from root's (the
         message names the rank and the setting), the errors of pert_op_new_ex on any
         rank (the message names the rank), and PERT_STATUS_SOLVER_FAILED when MPI fails.
         On error `*out` is untouched on every rank.
 */
pert_status pert_mpi_op_new(const pert_config *config, const int64_t *input_shape, size_t input_rank,
                            const int64_t *output_shape, size_t output_rank, MPI_Comm comm, int root,
                            pert_solver_ex solver, void *user_data, pert_worker_init init, pert_worker_fini fini,
                            pert_op **out);

/*
 pert_mpi_op_new with the communicator given as a Fortran handle (MPI_Comm_c2f): for
 bindings that pass communicators as integers, such as mpi4py (`comm.py2f()`) through
 ctypes.
 */
pert_status pert_mpi_op_new_f(const pert_config *config, const int64_t *input_shape, size_t input_rank,
                              const int64_t *output_shape, size_t output_rank, MPI_Fint comm, int root,
                              pert_solver_ex solver, void *user_data, pert_worker_init init, pert_worker_fini fini,
                              pert_op **out);

/*
 On a rank other than root: solves the blocks root hands out, until root frees its op.

 @param op  The handle pert_mpi_op_new gave this rank.
 @return PERT_STATUS_OK once root's op was freed; PERT_STATUS_NULL_ARGUMENT for NULL;
         PERT_STATUS_INVALID_ARGUMENT for a handle that is not a serving rank's (root's,
         or not from pert_mpi_op_new), or a call while pert_mpi_serve already runs on it;
         PERT_STATUS_SOLVER_FAILED when MPI fails (the message says how; a later call
         fails the same way: free the op). A solver failure does not end the service: it
         is reported to root, whose call fails.
 */
pert_status pert_mpi_serve(pert_op *op);

#ifdef __cplusplus
}
#endif

#endif /* PERTURBATIONS_MPI_H */
