/* The MPI component (see perturbations_mpi.h): an op on root whose solver hands blocks of
 * rows to root's own workers and to the other ranks.
 *
 * On every rank a "local" op (pert_op_new_ex over the user's solver, through `solve_block`,
 * which gives the solver the global rows) solves blocks with pert_op_solve. On root a
 * second op, the one the user gets, has one worker whose solver is `dispatch`: it cuts
 * each solver call into blocks, sends blocks to the other ranks (at most DEPTH in flight
 * per rank) and polls for their answers, while a driver thread takes blocks for root's
 * local op from the same cursor. All of root's MPI calls run on the dispatching worker or
 * on the thread that makes or frees the op, never two at once.
 *
 * Messages, on the library's duplicate communicator:
 *   root -> rank  TAG_WORK    header + count * d floats
 *                 TAG_CANCEL  one uint64: blocks of calls up to this id need no answer
 *                 TAG_STOP    nothing: the op was freed
 *   rank -> root  TAG_RESULT  header + count * o floats, or a message when status != 0
 */
#define _POSIX_C_SOURCE 200809L
#include "perturbations_mpi.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

enum { TAG_WORK = 1, TAG_RESULT = 2, TAG_CANCEL = 3, TAG_STOP = 4 };
enum { DEPTH = 2 };                  /* blocks in flight per rank: one solving, one waiting */
enum { MESSAGE_BYTES = 2048 };       /* the longest error message carried */
#define MAX_MESSAGE_BYTES (64u << 20) /* the largest block message, in bytes */
enum { RESULT_OK = 0, RESULT_FAILED = 1, RESULT_SKIPPED = 2 };

/* The header of a block and of its answer (plain uint64 words: MPI_BYTE on the wire). */
typedef struct {
  uint64_t call, seq, first_row, count, clean, num_samples, batch, status;
} header;

/* A block sent to a rank, waiting for its answer. */
typedef struct {
  uint64_t call, seq, start, count; /* start: the block's first row in the solver call */
  double since;                     /* when the rank could start on it */
} flight;

/* What root knows of one other rank. */
typedef struct {
  flight queue[DEPTH]; /* in the order sent (the rank answers in that order) */
  int inflight;
  char *send[DEPTH]; /* a send buffer per slot, with its request */
  size_t send_bytes[DEPTH];
  MPI_Request request[DEPTH];
  int next_slot;
} peer;

/* The rows of one solver call of root's op, shared by the dispatcher and the driver. */
typedef struct {
  const pert_solve_info *info;
  const float *in;
  float *out;
  size_t count, cursor; /* rows handed out: [0, cursor) */
  int active, abort, driver_done, driver_failed;
  char driver_message[MESSAGE_BYTES];
} job;

typedef struct ctx {
  /* the user's solver */
  pert_solver_ex solver;
  void *user_data;
  pert_worker_init init;
  pert_worker_fini fini;
  size_t d, o;
  /* the block the local op solves (solve_block gives the solver its global rows) */
  int in_block;
  uint64_t block_first_row, block_num_samples, block_batch;
  uint32_t block_clean;
  /* MPI */
  MPI_Comm comm;
  int rank, size, root;
  pid_t pid;
  double timeout;
  pert_op *local;
  int serving;
  /* root only */
  size_t *threads; /* each rank's workers */
  size_t all_threads, cap_rows;
  peer *peers;
  uint64_t calls;
  char *recv;
  size_t recv_bytes;
  pthread_t driver;
  int driver_started, quit;
  pthread_mutex_t lock;
  pthread_cond_t wake;
  job job;
  struct ctx *next; /* the registry of serving ranks' handles */
} ctx;

/* ---- small helpers ------------------------------------------------------------------ */

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void pause_briefly(unsigned polls) {
  if (polls < 64) return; /* spin a little first: answers often come within microseconds */
  struct timespec t = {0, polls < 1024 ? 20000 : 100000};
  nanosleep(&t, NULL);
}

static void format(char *buf, size_t len, const char *fmt, ...) {
  va_list args;
  va_start(args, fmt);
  vsnprintf(buf, len, fmt, args);
  va_end(args);
}

/* The library's last error on this thread. */
static void last_error(char *buf, size_t len) {
  pert_last_error(buf, len);
}

/* "MPI_Send failed: <MPI's text>" into buf; 1 when rc is an error. */
static int mpi_failed(int rc, const char *what, char *buf, size_t len) {
  if (rc == MPI_SUCCESS) return 0;
  char text[MPI_MAX_ERROR_STRING];
  int n = 0;
  if (MPI_Error_string(rc, text, &n) != MPI_SUCCESS) snprintf(text, sizeof text, "MPI error %d", rc);
  format(buf, len, "%s failed: %s", what, text);
  return 1;
}

static void *grow(char **buf, size_t *have, size_t want) {
  if (*have >= want) return *buf;
  char *bigger = realloc(*buf, want);
  if (!bigger) return NULL;
  *buf = bigger, *have = want;
  return bigger;
}

/* The registry of serving ranks' contexts, to find a handle's in pert_mpi_serve. */
static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static ctx *registry = NULL;

static ctx *registered(const pert_op *op) {
  pthread_mutex_lock(&registry_lock);
  ctx *c = registry;
  while (c && c->local != op) c = c->next;
  pthread_mutex_unlock(&registry_lock);
  return c;
}

static void unregister(ctx *c) {
  pthread_mutex_lock(&registry_lock);
  for (ctx **at = &registry; *at; at = &(*at)->next)
    if (*at == c) {
      *at = c->next;
      break;
    }
  pthread_mutex_unlock(&registry_lock);
}

/* ---- the local op: the user's solver, told the global rows -------------------------- */

static int32_t solve_block(void *user_data, const pert_solve_info *info, const float *in, size_t count,
                           float *out) {
  ctx *c = user_data;
  if (!c->in_block) return c->solver(c->user_data, info, in, count, out);
  pert_solve_info global = *info;
  if (global.struct_size > sizeof global) global.struct_size = (uint32_t)sizeof global;
  global.clean = c->block_clean;
  global.first_row = c->block_first_row + info->first_row; /* pert_op_solve counts from 0 */
  global.num_samples = c->block_num_samples;
  global.batch = (size_t)c->block_batch;
  return c->solver(c->user_data, &global, in, count, out);
}

static int32_t init_worker(void *user_data, uint32_t worker) {
  ctx *c = user_data;
  return c->init ? c->init(c->user_data, worker) : 0;
}

static void fini_worker(void *user_data, uint32_t worker) {
  ctx *c = user_data;
  if (c->fini) c->fini(c->user_data, worker);
}

/* Solves `count` rows of a block with the local op: 0, or non-zero with the message. */
static int solve_rows(ctx *c, const header *h, const float *in, size_t count, float *out, char *msg, size_t len) {
  c->block_clean = (uint32_t)h->clean;
  c->block_first_row = h->first_row;
  c->block_num_samples = h->num_samples;
  c->block_batch = h->batch;
  c->in_block = 1;
  pert_status s = pert_op_solve(c->local, in, count, out);
  c->in_block = 0;
  if (s == PERT_STATUS_OK) return 0;
  last_error(msg, len);
  return 1;
}

/* ---- root: the driver thread, which solves blocks on root's own workers ------------- */

/* Guided block sizes: about (rows left) / (2 * all threads) per thread, for `threads`. */
static size_t block_rows(const ctx *c, size_t left, size_t threads) {
  size_t per = left / (2 * c->all_threads);
  size_t rows = (per ? per : 1) * threads;
  if (rows > c->cap_rows) rows = c->cap_rows;
  return rows < left ? rows : left;
}

/* The next block for a rank of `threads` workers, from the call's cursor (lock held). */
static size_t take(ctx *c, size_t threads, size_t *start) {
  job *j = &c->job;
  if (j->abort || j->cursor >= j->count) return 0;
  size_t rows = block_rows(c, j->count - j->cursor, threads);
  *start = j->cursor;
  j->cursor += rows;
  return rows;
}

static void *drive(void *arg) {
  ctx *c = arg;
  job *j = &c->job;
  pthread_mutex_lock(&c->lock);
  for (;;) {
    while (!c->quit && !(j->active && !j->driver_done)) pthread_cond_wait(&c->wake, &c->lock);
    if (c->quit) break;
    size_t start = 0, rows;
    while ((rows = take(c, c->threads[c->rank], &start)) > 0) {
      pthread_mutex_unlock(&c->lock);
      const pert_solve_info *info = j->info;
      header h = {0, 0, info->first_row + start, rows, info->clean, info->num_samples, info->batch, 0};
      char msg[MESSAGE_BYTES];
      int failed = solve_rows(c, &h, j->in + start * c->d, rows, j->out + start * c->o, msg, sizeof msg);
      pthread_mutex_lock(&c->lock);
      if (failed) {
        j->driver_failed = 1, j->abort = 1;
        memcpy(j->driver_message, msg, sizeof msg);
        break;
      }
    }
    j->driver_done = 1;
    pthread_cond_broadcast(&c->wake);
  }
  pthread_mutex_unlock(&c->lock);
  return NULL;
}

/* ---- root: the dispatcher, the solver of root's op ---------------------------------- */

/* Sends rows [start, start + rows) of the call to rank r. */
static int send_block(ctx *c, int r, const pert_solve_info *info, const float *in, size_t start, size_t rows,
                      char *msg, size_t len) {
  peer *p = &c->peers[r];
  int slot = p->next_slot;
  int rc = MPI_Wait(&p->request[slot], MPI_STATUS_IGNORE); /* the slot's last send (long done) */
  if (mpi_failed(rc, "MPI_Wait", msg, len)) return 1;
  size_t bytes = sizeof(header) + rows * c->d * sizeof(float);
  if (!grow(&p->send[slot], &p->send_bytes[slot], bytes)) {
    format(msg, len, "out of memory for a block of %zu bytes to rank %d", bytes, r);
    return 1;
  }
  header h = {c->calls, start, info->first_row + start, rows, info->clean, info->num_samples, info->batch, 0};
  memcpy(p->send[slot], &h, sizeof h);
  memcpy(p->send[slot] + sizeof h, in + start * c->d, rows * c->d * sizeof(float));
  rc = MPI_Isend(p->send[slot], (int)bytes, MPI_BYTE, r, TAG_WORK, c->comm, &p->request[slot]);
  if (mpi_failed(rc, "MPI_Isend", msg, len)) return 1;
  flight f = {c->calls, start, start, rows, now()}; /* (a queued block's clock restarts when it starts) */
  p->queue[p->inflight++] = f;
  p->next_slot = (slot + 1) % DEPTH;
  return 0;
}

/* "problem 3, sample 7" (or "unperturbed problem 3") for row `row` of a solver call. */
static void describe_row(const pert_solve_info *info, size_t row, char *buf, size_t len) {
  unsigned long long global = (unsigned long long)(info->first_row + row), n = info->num_samples ? info->num_samples : 1;
  if (info->clean)
    format(buf, len, "unperturbed problem %llu", global);
  else
    format(buf, len, "problem %llu, sample %llu", global / n, global % n);
}

/* Receives one answer if one has come: 1 when one was handled, 0 when none, -1 on an MPI
 * error (msg). A failed block of the current call sets *failed and its message. */
static int receive_answer(ctx *c, float *out, int *outstanding, int *failed, char *msg, size_t len) {
  int flag = 0;
  MPI_Status st;
  int rc = MPI_Iprobe(MPI_ANY_SOURCE, TAG_RESULT, c->comm, &flag, &st);
  if (mpi_failed(rc, "MPI_Iprobe", msg, len)) return -1;
  if (!flag) return 0;
  int bytes = 0;
  MPI_Get_count(&st, MPI_BYTE, &bytes);
  if (bytes < (int)sizeof(header) || !grow(&c->recv, &c->recv_bytes, (size_t)bytes)) {
    format(msg, len, "an answer of %d bytes from rank %d cannot be received", bytes, st.MPI_SOURCE);
    return -1;
  }
  rc = MPI_Recv(c->recv, bytes, MPI_BYTE, st.MPI_SOURCE, TAG_RESULT, c->comm, MPI_STATUS_IGNORE);
  if (mpi_failed(rc, "MPI_Recv", msg, len)) return -1;
  header h;
  memcpy(&h, c->recv, sizeof h);
  peer *p = &c->peers[st.MPI_SOURCE];
  if (p->inflight == 0 || p->queue[0].call != h.call || p->queue[0].seq != h.seq) {
    format(msg, len, "rank %d answered a block it was not given", st.MPI_SOURCE);
    return -1;
  }
  flight f = p->queue[0];
  memmove(p->queue, p->queue + 1, (size_t)(p->inflight - 1) * sizeof(flight));
  p->inflight--;
  if (p->inflight > 0 && p->queue[0].since < now()) p->queue[0].since = now(); /* it starts now */
  if (h.call != c->calls) return 1; /* a late answer of a failed call: dropped */
  (*outstanding)--;
  if (h.status == RESULT_OK && (size_t)bytes == sizeof h + f.count * c->o * sizeof(float)) {
    memcpy(out + f.start * c->o, c->recv + sizeof h, f.count * c->o * sizeof(float));
  } else if (!*failed) {
    const pert_solve_info *info = c->job.info;
    int n = bytes - (int)sizeof h;
    char first[64], last[64];
    describe_row(info, f.start, first, sizeof first);
    describe_row(info, f.start + f.count - 1, last, sizeof last);
    if (h.status == RESULT_FAILED)
      format(msg, len, "rank %d failed on %s to %s: %.*s", st.MPI_SOURCE, first, last, n, c->recv + sizeof h);
    else
      format(msg, len, "rank %d answered a block with %d bytes instead of %zu", st.MPI_SOURCE, bytes,
             sizeof h + f.count * c->o * sizeof(float));
    *failed = 1;
  }
  return 1;
}

/* Ranks holding blocks of the failed call are told to skip those they have not begun. */
static void cancel_call(ctx *c) {
  for (int r = 0; r < c->size; r++) {
    peer *p = &c->peers[r];
    int holds = 0;
    for (int i = 0; i < p->inflight; i++) holds |= p->queue[i].call == c->calls;
    if (r != c->rank && holds) {
      uint64_t id = c->calls;
      MPI_Send(&id, (int)sizeof id, MPI_BYTE, r, TAG_CANCEL, c->comm); /* 8 bytes: eager */
    }
  }
}

/* Hands out blocks to the other ranks and collects their answers until the call's rows
 * are all handed out and answered (0), or a rank fails or times out (1, msg). */
static int spread(ctx *c, const pert_solve_info *info, const float *in, float *out, char *msg, size_t len) {
  int outstanding = 0, failed = 0;
  unsigned polls = 0;
  for (;;) {
    for (int r = 0; r < c->size && !failed; r++) {
      peer *p = &c->peers[r];
      int late = 0; /* a rank still owing answers of a failed call gets no work until it answers */
      for (int i = 0; i < p->inflight; i++) late |= p->queue[i].call != c->calls;
      while (r != c->rank && !late && p->inflight < DEPTH) {
        size_t start = 0, rows = 0;
        pthread_mutex_lock(&c->lock);
        /* a second block waits in a rank's queue only while many rows are left: at the end
         * of the call, the last blocks go to the ranks that are free */
        if (p->inflight == 0 || c->job.count - c->job.cursor > 4 * c->all_threads) rows = take(c, c->threads[r], &start);
        pthread_mutex_unlock(&c->lock);
        if (rows == 0) break;
        if (send_block(c, r, info, in, start, rows, msg, len)) return 1;
        outstanding++, polls = 0;
      }
    }
    if (failed) break;
    pthread_mutex_lock(&c->lock);
    int exhausted = c->job.cursor >= c->job.count || c->job.abort;
    pthread_mutex_unlock(&c->lock);
    if (outstanding == 0 && exhausted) return 0;
    int got = receive_answer(c, out, &outstanding, &failed, msg, len);
    if (got < 0) return 1;
    if (got) {
      polls = 0;
      continue;
    }
    double t = now();
    for (int r = 0; r < c->size && !failed; r++) {
      flight *head = c->peers[r].inflight ? &c->peers[r].queue[0] : NULL;
      if (r != c->rank && head && head->call == c->calls && t - head->since > c->timeout) {
        format(msg, len,
               "rank %d did not answer a block of %llu rows within %g s (remote_timeout): it is dead or stuck; "
               "later calls go on without it until it answers",
               r, (unsigned long long)head->count, c->timeout);
        failed = 1;
      }
    }
    pause_briefly(++polls);
  }
  cancel_call(c);
  return 1;
}

static int32_t dispatch(void *user_data, const pert_solve_info *info, const float *in, size_t count, float *out) {
  ctx *c = user_data;
  char msg[MESSAGE_BYTES] = "";
  c->calls++;
  pthread_mutex_lock(&c->lock);
  job *j = &c->job;
  j->info = info, j->in = in, j->out = out, j->count = count, j->cursor = 0;
  j->abort = 0, j->driver_done = 0, j->driver_failed = 0, j->active = 1;
  pthread_cond_broadcast(&c->wake);
  pthread_mutex_unlock(&c->lock);

  int failed = spread(c, info, in, out, msg, sizeof msg);

  pthread_mutex_lock(&c->lock);
  if (failed) j->abort = 1;
  pthread_mutex_unlock(&c->lock);
  if (failed) pert_op_interrupt(c->local); /* root's block in progress stops early */
  pthread_mutex_lock(&c->lock);
  while (!j->driver_done) pthread_cond_wait(&c->wake, &c->lock);
  j->active = 0;
  if (!failed && j->driver_failed) {
    format(msg, sizeof msg, "rank %d (root) failed: %s", c->rank, j->driver_message);
    failed = 1;
  }
  pthread_mutex_unlock(&c->lock);
  if (failed) pert_solver_set_error(msg);
  return failed;
}

/* ---- the end of the service --------------------------------------------------------- */

static void free_ctx(ctx *c) {
  if (c->peers)
    for (int r = 0; r < c->size; r++)
      for (int s = 0; s < DEPTH; s++) free(c->peers[r].send[s]);
  free(c->peers);
  free(c->threads);
  free(c->recv);
  free(c);
}

static int mpi_usable(void) {
  int finalized = 1, initialized = 0;
  MPI_Finalized(&finalized);
  MPI_Initialized(&initialized);
  return initialized && !finalized;
}

/* Root's op is freed: the driver stops, root's local op is freed, every rank is told to
 * stop, late answers are drained for up to the timeout (so that no rank waits on a send),
 * and the communicator is freed. */
static void root_freed(void *data) {
  ctx *c = data;
  if (getpid() != c->pid) return; /* a forked child: not a rank; the parent keeps all */
  pthread_mutex_lock(&c->lock);
  c->quit = 1;
  pthread_cond_broadcast(&c->wake);
  pthread_mutex_unlock(&c->lock);
  if (c->driver_started) pthread_join(c->driver, NULL);
  pert_op_free(c->local);
  if (mpi_usable()) {
    char msg[MESSAGE_BYTES];
    for (int r = 0; r < c->size; r++)
      if (r != c->rank) MPI_Send(NULL, 0, MPI_BYTE, r, TAG_STOP, c->comm);
    double until = now() + (c->timeout < 5 ? c->timeout : 5);
    c->calls++; /* every answer still due is late */
    for (unsigned polls = 0;; pause_briefly(++polls)) {
      int due = 0, outstanding = 0, failed = 0;
      for (int r = 0; r < c->size; r++) due += c->peers[r].inflight;
      if (due == 0 || now() > until || receive_answer(c, NULL, &outstanding, &failed, msg, sizeof msg) < 0) break;
    }
    for (int r = 0; r < c->size; r++)
      for (int s = 0; s < DEPTH; s++) {
        int done = 0;
        MPI_Test(&c->peers[r].request[s], &done, MPI_STATUS_IGNORE);
        if (!done) { /* a rank that never took its block: leave the buffer to MPI */
          MPI_Request_free(&c->peers[r].request[s]);
          c->peers[r].send[s] = NULL;
        }
      }
    MPI_Comm_free(&c->comm);
  }
  pthread_mutex_destroy(&c->lock);
  pthread_cond_destroy(&c->wake);
  free_ctx(c);
}

/* A serving rank's handle is freed (after its workers' fini hooks). */
static void rank_freed(void *data) {
  ctx *c = data;
  unregister(c);
  if (getpid() != c->pid) return;
  if (mpi_usable()) MPI_Comm_free(&c->comm);
  free_ctx(c);
}

/* ---- serving ranks ------------------------------------------------------------------ */

/* Answers one block: the solutions, or the failure's message. */
static int answer(ctx *c, header h, const float *in, char **buf, size_t *have, char *msg, size_t len) {
  size_t data = h.count * c->o * sizeof(float);
  if (!grow(buf, have, sizeof h + (data > MESSAGE_BYTES ? data : MESSAGE_BYTES))) {
    h.status = RESULT_FAILED;
    memcpy(*buf, &h, sizeof h); /* (serve made room for a header and a message first) */
    int n = snprintf(*buf + sizeof h, MESSAGE_BYTES, "out of memory for %zu bytes of solutions", data);
    return mpi_failed(MPI_Send(*buf, (int)sizeof h + n, MPI_BYTE, c->root, TAG_RESULT, c->comm), "MPI_Send", msg,
                      len);
  }
  size_t bytes = sizeof h;
  if (h.status == RESULT_OK) {
    char text[MESSAGE_BYTES];
    if (solve_rows(c, &h, in, (size_t)h.count, (float *)(void *)(*buf + sizeof h), text, sizeof text)) {
      h.status = RESULT_FAILED;
      /* root names the rows: the library's own naming of them (local to the block) goes */
      const char *why = text, *prefix = "the solver failed on ";
      if (strncmp(text, prefix, strlen(prefix)) == 0 && strstr(text, ": ")) why = strstr(text, ": ") + 2;
      size_t n = strlen(why);
      memmove(*buf + sizeof h, why, n);
      bytes += n;
    } else {
      bytes += data;
    }
  }
  memcpy(*buf, &h, sizeof h);
  return mpi_failed(MPI_Send(*buf, (int)bytes, MPI_BYTE, c->root, TAG_RESULT, c->comm), "MPI_Send", msg, len);
}

/* 1 when a message with `tag` from root is waiting. */
static int waiting(ctx *c, int tag, MPI_Status *st, int *rc) {
  int flag = 0;
  *rc = MPI_Iprobe(c->root, tag, c->comm, &flag, st);
  return *rc == MPI_SUCCESS && flag;
}

static pert_status serve(ctx *c) {
  char msg[MESSAGE_BYTES], *work = NULL, *reply = NULL;
  size_t work_bytes = 0, reply_bytes = 0;
  uint64_t cancelled = 0;
  int rc = MPI_SUCCESS;
  pert_status status = PERT_STATUS_OK;
  if (!grow(&reply, &reply_bytes, sizeof(header) + MESSAGE_BYTES))
    return pert_set_last_error(PERT_STATUS_TORCH_ERROR, "out of memory for the answers' buffer");
  for (;;) {
    MPI_Status st;
    rc = MPI_Probe(c->root, MPI_ANY_TAG, c->comm, &st);
    if (mpi_failed(rc, "MPI_Probe", msg, sizeof msg)) break;
    if (waiting(c, TAG_STOP, &st, &rc)) {
      MPI_Recv(NULL, 0, MPI_BYTE, c->root, TAG_STOP, c->comm, MPI_STATUS_IGNORE);
      break;
    }
    while (waiting(c, TAG_CANCEL, &st, &rc)) {
      uint64_t id = 0;
      rc = MPI_Recv(&id, (int)sizeof id, MPI_BYTE, c->root, TAG_CANCEL, c->comm, MPI_STATUS_IGNORE);
      if (rc != MPI_SUCCESS) break;
      if (id > cancelled) cancelled = id;
    }
    if (mpi_failed(rc, "MPI_Iprobe", msg, sizeof msg)) break;
    if (!waiting(c, TAG_WORK, &st, &rc)) {
      if (mpi_failed(rc, "MPI_Iprobe", msg, sizeof msg)) break;
      continue;
    }
    int bytes = 0;
    MPI_Get_count(&st, MPI_BYTE, &bytes);
    if (bytes < (int)sizeof(header) || !grow(&work, &work_bytes, (size_t)bytes)) {
      format(msg, sizeof msg, "a block of %d bytes from root cannot be received", bytes);
      rc = MPI_ERR_OTHER;
      break;
    }
    rc = MPI_Recv(work, bytes, MPI_BYTE, c->root, TAG_WORK, c->comm, MPI_STATUS_IGNORE);
    if (mpi_failed(rc, "MPI_Recv", msg, sizeof msg)) break;
    header h;
    memcpy(&h, work, sizeof h);
    if ((size_t)bytes != sizeof h + h.count * c->d * sizeof(float)) {
      format(msg, sizeof msg, "a block of %d bytes from root does not hold its %llu rows", bytes,
             (unsigned long long)h.count);
      rc = MPI_ERR_OTHER;
      break;
    }
    h.status = h.call <= cancelled ? RESULT_SKIPPED : RESULT_OK;
    rc = answer(c, h, (const float *)(void *)(work + sizeof h), &reply, &reply_bytes, msg, sizeof msg);
    if (rc) break;
  }
  if (rc != MPI_SUCCESS) status = pert_set_last_error(PERT_STATUS_SOLVER_FAILED, msg);
  free(work);
  free(reply);
  return status;
}

pert_status pert_mpi_serve(pert_op *op) {
  if (!op) return pert_set_last_error(PERT_STATUS_NULL_ARGUMENT, "op is NULL");
  ctx *c = registered(op);
  if (!c)
    return pert_set_last_error(PERT_STATUS_INVALID_ARGUMENT,
                               "op is not a serving rank's handle from pert_mpi_op_new (root's op, or "
                               "another op, or one already freed)");
  pthread_mutex_lock(&registry_lock);
  int busy = c->serving;
  c->serving = 1;
  pthread_mutex_unlock(&registry_lock);
  if (busy) return pert_set_last_error(PERT_STATUS_INVALID_ARGUMENT, "pert_mpi_serve already runs on this op");
  if (!mpi_usable()) {
    c->serving = 0;
    return pert_set_last_error(PERT_STATUS_INVALID_ARGUMENT, "MPI is not initialized, or already finalized");
  }
  pert_status s = serve(c);
  pthread_mutex_lock(&registry_lock);
  c->serving = 0;
  pthread_mutex_unlock(&registry_lock);
  return s;
}

/* ---- construction --------------------------------------------------------------------- */

/* Settings that are each rank's own (or root's alone): not compared. */
static int own_setting(const char *line) {
  static const char *own[] = {"threads=", "max_threads=", "device=", "chunk_bytes=", "max_tape_bytes=",
                              "remote_timeout="};
  for (size_t i = 0; i < sizeof own / sizeof own[0]; i++)
    if (strncmp(line, own[i], strlen(own[i])) == 0) return 1;
  return 0;
}

/* This rank's part of the handshake: "ok <threads>\n<settings>" or "error <status>\n<message>". */
static char *rank_report(const pert_config *config, const int64_t *in_shape, size_t in_rank, const int64_t *out_shape,
                         size_t out_rank, pert_status status, const char *message, size_t *threads) {
  size_t cap = 8192;
  char *text = malloc(cap);
  if (!text) return NULL;
  if (status != PERT_STATUS_OK) {
    snprintf(text, cap, "error %u\n%s", status, message);
    return text;
  }
  size_t n = pert_config_describe(config, NULL, 0);
  char *all = malloc(n + 1);
  if (!all) {
    free(text);
    return NULL;
  }
  pert_config_describe(config, all, n + 1);
  size_t at = (size_t)snprintf(text, cap, "ok %zu\ninput_shape=", *threads);
  for (size_t i = 0; i < in_rank && at < cap; i++) at += (size_t)snprintf(text + at, cap - at, "%lld,", (long long)in_shape[i]);
  if (at < cap) at += (size_t)snprintf(text + at, cap - at, "\noutput_shape=");
  for (size_t i = 0; i < out_rank && at < cap; i++)
    at += (size_t)snprintf(text + at, cap - at, "%lld,", (long long)out_shape[i]);
  if (at < cap) at += (size_t)snprintf(text + at, cap - at, "\n");
  char *rest = NULL;
  for (char *line = strtok_r(all, "\n", &rest); line && at < cap; line = strtok_r(NULL, "\n", &rest))
    if (!own_setting(line)) at += (size_t)snprintf(text + at, cap - at, "%s\n", line);
  free(all);
  return text;
}

/* Root's verdict on the reports: OK, or the first rank's error or differing setting. */
static pert_status verdict(char **reports, int size, int root, size_t *threads, char *msg, size_t len) {
  for (int r = 0; r < size; r++) {
    unsigned status = 0;
    if (sscanf(reports[r], "error %u", &status) == 1) {
      format(msg, len, "rank %d: %s", r, strchr(reports[r], '\n') + 1);
      return status;
    }
  }
  const char *mine = strchr(reports[root], '\n') + 1;
  for (int r = 0; r < size; r++) {
    sscanf(reports[r], "ok %zu", &threads[r]);
    if (threads[r] == 0) threads[r] = 1;
    const char *theirs = strchr(reports[r], '\n') + 1;
    if (strcmp(mine, theirs) == 0) continue;
    const char *a = mine, *b = theirs; /* the first line that differs */
    while (*a && *b) {
      size_t la = strcspn(a, "\n"), lb = strcspn(b, "\n");
      if (la != lb || strncmp(a, b, la) != 0) {
        format(msg, len, "rank %d's settings differ from root's: %.*s (root %d: %.*s)", r, (int)lb, b, root, (int)la, a);
        return PERT_STATUS_INVALID_ARGUMENT;
      }
      a += la + (a[la] == '\n'), b += lb + (b[lb] == '\n');
    }
    format(msg, len, "rank %d's settings differ from root's", r);
    return PERT_STATUS_INVALID_ARGUMENT;
  }
  return PERT_STATUS_OK;
}

/* Gathers every rank's report on root, which decides; every rank learns the verdict. */
static pert_status handshake(ctx *c, const char *report, size_t *threads, char *msg, size_t len) {
  int mine = (int)strlen(report) + 1, *sizes = NULL, *offsets = NULL;
  char *all = NULL, **reports = NULL;
  int rc = MPI_SUCCESS;
  if (c->rank == c->root) {
    sizes = calloc((size_t)c->size, sizeof *sizes), offsets = calloc((size_t)c->size, sizeof *offsets);
    reports = calloc((size_t)c->size, sizeof *reports);
  }
  rc = MPI_Gather(&mine, 1, MPI_INT, sizes, 1, MPI_INT, c->root, c->comm);
  int total = 0;
  if (rc == MPI_SUCCESS && c->rank == c->root && sizes && offsets && reports) {
    for (int r = 0; r < c->size; r++) offsets[r] = total, total += sizes[r];
    all = malloc((size_t)total);
  }
  if (rc == MPI_SUCCESS) rc = MPI_Gatherv(report, mine, MPI_CHAR, all, sizes, offsets, MPI_CHAR, c->root, c->comm);
  long long decided[2] = {PERT_STATUS_OK, 0}; /* status, message length */
  if (c->rank == c->root) {
    if (rc != MPI_SUCCESS) mpi_failed(rc, "MPI_Gatherv", msg, len), decided[0] = PERT_STATUS_SOLVER_FAILED;
    else if (!all) format(msg, len, "out of memory for the ranks' settings"), decided[0] = PERT_STATUS_TORCH_ERROR;
    else {
      for (int r = 0; r < c->size; r++) reports[r] = all + offsets[r];
      decided[0] = verdict(reports, c->size, c->root, threads, msg, len);
    }
    decided[1] = decided[0] == PERT_STATUS_OK ? 0 : (long long)strlen(msg) + 1;
  }
  free(all), free(sizes), free(offsets), free(reports);
  int brc = MPI_Bcast(decided, 2, MPI_LONG_LONG, c->root, c->comm);
  if (brc == MPI_SUCCESS && decided[1] > 0) brc = MPI_Bcast(msg, (int)decided[1], MPI_CHAR, c->root, c->comm);
  if (brc == MPI_SUCCESS) brc = MPI_Bcast(threads, c->size * (int)sizeof *threads, MPI_BYTE, c->root, c->comm);
  if (mpi_failed(brc, "MPI_Bcast", msg, len)) return PERT_STATUS_SOLVER_FAILED;
  return (pert_status)decided[0];
}

/* The rank's workers: its config's threads (0: one per core, within max_threads). */
static size_t rank_threads(const pert_config *config) {
  size_t n = pert_config_describe(config, NULL, 0);
  char *text = malloc(n + 1);
  unsigned long threads = 1, cap = 0;
  if (!text) return 1;
  pert_config_describe(config, text, n + 1);
  const char *t = strstr(text, "\nthreads="), *m = strstr(text, "\nmax_threads=");
  if (t) threads = strtoul(t + 9, NULL, 10);
  if (m) cap = strtoul(m + 13, NULL, 10);
  free(text);
  if (threads == 0) {
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    threads = cores > 0 ? (unsigned long)cores : 1;
    if (cap && threads > cap) threads = cap;
  }
  return threads;
}

/* Root's part once the ranks agree: the op the user gets, and the driver thread. */
static pert_status make_root(ctx *c, const pert_config *config, const int64_t *in_shape, size_t in_rank,
                             const int64_t *out_shape, size_t out_rank, pert_op **op) {
  pert_config *one = NULL;
  pert_status s = pert_config_clone(config, &one);
  if (s == PERT_STATUS_OK) s = pert_config_set_threads(one, 1);
  if (s == PERT_STATUS_OK) s = pert_op_new_ex(one, in_shape, in_rank, out_shape, out_rank, dispatch, c, NULL, NULL, op);
  pert_config_free(one);
  return s;
}

static size_t numel(const int64_t *shape, size_t rank) {
  size_t n = 1;
  for (size_t i = 0; i < rank; i++) n *= shape[i] > 0 ? (size_t)shape[i] : 0;
  return n;
}

/* Reads the timeout from the config's description. */
static double config_timeout(const pert_config *config) {
  char text[4096];
  pert_config_describe(config, text, sizeof text);
  const char *t = strstr(text, "\nremote_timeout=");
  return t ? strtod(t + 16, NULL) : 600.0;
}

/* This rank's own checks and its local op: a status and its message. */
static pert_status local_part(ctx *c, const pert_config *config, const int64_t *in_shape, size_t in_rank,
                              const int64_t *out_shape, size_t out_rank, pert_op **out, char *msg, size_t len) {
  int level = MPI_THREAD_SINGLE;
  MPI_Query_thread(&level);
  pert_status s = PERT_STATUS_OK;
  if (!out) s = pert_set_last_error(PERT_STATUS_NULL_ARGUMENT, "out is NULL");
  else if (!config) s = pert_set_last_error(PERT_STATUS_NULL_ARGUMENT, "config is NULL");
  else if (!c->solver) s = pert_set_last_error(PERT_STATUS_NULL_ARGUMENT, "solver is NULL");
  else if (c->rank == c->root && level < MPI_THREAD_SERIALIZED)
    s = pert_set_last_error(PERT_STATUS_INVALID_ARGUMENT,
                            "root's MPI thread level is below MPI_THREAD_SERIALIZED: initialize MPI with "
                            "MPI_Init_thread(&argc, &argv, MPI_THREAD_SERIALIZED, &provided)");
  else
    s = pert_op_new_ex(config, in_shape, in_rank, out_shape, out_rank, solve_block, c, init_worker, fini_worker,
                       &c->local);
  if (s == PERT_STATUS_OK) {
    c->d = numel(in_shape, in_rank), c->o = numel(out_shape, out_rank);
    size_t row = (c->d > c->o ? c->d : c->o) * sizeof(float);
    if (row > MAX_MESSAGE_BYTES - sizeof(header))
      s = pert_set_last_error(PERT_STATUS_INVALID_ARGUMENT, "a row takes more than 64 MiB: too large for one block");
    c->cap_rows = (MAX_MESSAGE_BYTES - sizeof(header)) / (row ? row : 1);
    c->timeout = config_timeout(config);
  }
  if (s != PERT_STATUS_OK) last_error(msg, len);
  return s;
}

static void undo(ctx *c, pert_op *root_op) {
  if (root_op) pert_op_free(root_op); /* its hook is not set yet */
  if (c->driver_started) {
    pthread_mutex_lock(&c->lock);
    c->quit = 1;
    pthread_cond_broadcast(&c->wake);
    pthread_mutex_unlock(&c->lock);
    pthread_join(c->driver, NULL);
  }
  pert_op_free(c->local);
  if (c->comm != MPI_COMM_NULL) MPI_Comm_free(&c->comm);
  pthread_mutex_destroy(&c->lock);
  pthread_cond_destroy(&c->wake);
  free_ctx(c);
}

pert_status pert_mpi_op_new(const pert_config *config, const int64_t *input_shape, size_t input_rank,
                            const int64_t *output_shape, size_t output_rank, MPI_Comm comm, int root,
                            pert_solver_ex solver, void *user_data, pert_worker_init init, pert_worker_fini fini,
                            pert_op **out) {
  if (!mpi_usable()) return pert_set_last_error(PERT_STATUS_INVALID_ARGUMENT, "MPI is not initialized, or finalized");
  int size = 0, rank = 0;
  if (comm == MPI_COMM_NULL) return pert_set_last_error(PERT_STATUS_INVALID_ARGUMENT, "comm is MPI_COMM_NULL");
  MPI_Comm_size(comm, &size);
  MPI_Comm_rank(comm, &rank);
  char msg[MESSAGE_BYTES] = "";
  if (root < 0 || root >= size) {
    format(msg, sizeof msg, "root %d is not a rank of comm (size %d)", root, size);
    return pert_set_last_error(PERT_STATUS_INVALID_ARGUMENT, msg);
  }
  ctx *c = calloc(1, sizeof *c);
  if (!c) return pert_set_last_error(PERT_STATUS_TORCH_ERROR, "out of memory for the MPI component's state");
  c->solver = solver, c->user_data = user_data, c->init = init, c->fini = fini;
  c->rank = rank, c->size = size, c->root = root, c->pid = getpid(), c->comm = MPI_COMM_NULL;
  pthread_mutex_init(&c->lock, NULL);
  pthread_cond_init(&c->wake, NULL);
  int rc = MPI_Comm_dup(comm, &c->comm);
  if (rc == MPI_SUCCESS) rc = MPI_Comm_set_errhandler(c->comm, MPI_ERRORS_RETURN);
  if (mpi_failed(rc, "MPI_Comm_dup", msg, sizeof msg)) {
    if (c->comm != MPI_COMM_NULL) MPI_Comm_free(&c->comm);
    c->comm = MPI_COMM_NULL;
    undo(c, NULL);
    return pert_set_last_error(PERT_STATUS_SOLVER_FAILED, msg);
  }
  pert_status s = local_part(c, config, input_shape, input_rank, output_shape, output_rank, out, msg, sizeof msg);
  size_t mine = s == PERT_STATUS_OK ? rank_threads(config) : 1;
  pert_op *root_op = NULL;
  c->threads = calloc((size_t)size, sizeof *c->threads);
  c->peers = calloc((size_t)size, sizeof *c->peers);
  if (s == PERT_STATUS_OK && (!c->threads || !c->peers))
    s = PERT_STATUS_TORCH_ERROR, format(msg, sizeof msg, "out of memory for the MPI component's state");
  if (s == PERT_STATUS_OK && rank == root) {
    s = make_root(c, config, input_shape, input_rank, output_shape, output_rank, &root_op);
    if (s == PERT_STATUS_OK) {
      c->driver_started = pthread_create(&c->driver, NULL, drive, c) == 0;
      if (!c->driver_started) s = PERT_STATUS_TORCH_ERROR, format(msg, sizeof msg, "cannot start the driver thread");
    } else {
      last_error(msg, sizeof msg);
    }
  }
  char *report = rank_report(config, input_shape, input_rank, output_shape, output_rank, s, msg, &mine);
  size_t fallback[1] = {1};
  size_t *threads = c->threads ? c->threads : fallback; /* (a rank out of memory still takes part) */
  pert_status agreed = handshake(c, report ? report : "error 6\nout of memory for the settings' report", threads, msg, sizeof msg);
  free(report);
  if (agreed != PERT_STATUS_OK || !c->threads) {
    undo(c, root_op);
    return pert_set_last_error(agreed != PERT_STATUS_OK ? agreed : PERT_STATUS_TORCH_ERROR, msg);
  }
  for (int r = 0; r < size; r++) c->all_threads += c->threads[r];
  for (int r = 0; r < size; r++)
    for (int k = 0; k < DEPTH; k++) c->peers[r].request[k] = MPI_REQUEST_NULL;
  if (rank == root) {
    pert_op_on_free(root_op, root_freed, c);
    *out = root_op;
  } else {
    pert_op_on_free(c->local, rank_freed, c);
    pthread_mutex_lock(&registry_lock);
    c->next = registry, registry = c;
    pthread_mutex_unlock(&registry_lock);
    *out = c->local;
  }
  return PERT_STATUS_OK;
}

pert_status pert_mpi_op_new_f(const pert_config *config, const int64_t *input_shape, size_t input_rank,
                              const int64_t *output_shape, size_t output_rank, MPI_Fint comm, int root,
                              pert_solver_ex solver, void *user_data, pert_worker_init init, pert_worker_fini fini,
                              pert_op **out) {
  if (!mpi_usable()) return pert_set_last_error(PERT_STATUS_INVALID_ARGUMENT, "MPI is not initialized, or finalized");
  return pert_mpi_op_new(config, input_shape, input_rank, output_shape, output_rank, MPI_Comm_f2c(comm), root, solver,
                         user_data, init, fini, out);
}
