/* The MPI component (see perturbations_mpi.h): an op on root whose solver hands blocks of
 * rows to root's own workers and to the other ranks.
 *
 * On every rank a "local" op (pert_op_new_ex over the user's solver, through `solve_block`,
 * which gives the solver the global rows) solves blocks with pert_op_solve. On root a
 * second op, the one the user gets, has one worker whose solver is `dispatch`: it cuts
 * each solver call into blocks, sends blocks to the other ranks (at most DEPTH in flight
 * per rank) and polls for their answers, while a driver thread takes blocks for root's
 * local op from the same cursor. Serving ranks poll too (never a blocking MPI call that
 * could wait for ever), and answer with non-blocking sends. A process-wide lock makes the
 * component's MPI calls one at a time (several ops, several serving threads), so
 * MPI_THREAD_SERIALIZED is enough.
 *
 * Messages, on the library's duplicate communicator:
 *   root -> rank  TAG_WORK    header + count * d floats
 *                 TAG_CANCEL  one uint64: blocks of calls up to this id need no answer
 *                 TAG_STOP    nothing: the op was freed
 *   rank -> root  TAG_RESULT  header + count * o floats, or a message when status != 0;
 *                             status RESULT_STOPPED: the rank's service has ended
 * A rank that has seen TAG_STOP sends no answer any more (root would not take it), only
 * RESULT_STOPPED; root waits for those (within a bound) before it frees its buffers.
 */
#define _POSIX_C_SOURCE 200809L
#include "perturbations_mpi.h"

#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

enum { TAG_WORK = 1, TAG_RESULT = 2, TAG_CANCEL = 3, TAG_STOP = 4 };
enum { DEPTH = 2 };                   /* blocks in flight per rank: one solving, one waiting */
enum { MESSAGE_BYTES = 2048 };        /* the longest error message carried */
enum { ROWS_PER_WORKER = 32 };        /* the most rows of one block per worker of its rank */
#define MAX_MESSAGE_BYTES (64u << 20) /* the largest block message, in bytes */
enum { RESULT_OK = 0, RESULT_FAILED = 1, RESULT_SKIPPED = 2, RESULT_STOPPED = 3 };
enum { ENDED_STOPPED = 1, ENDED_FAILED = 2 }; /* how a rank's service ended: root was told either way */
static const double STOP_GRACE = 1.0; /* seconds a stopping rank waits for its last answer */

/* The header of a block and of its answer (plain uint64 words: MPI_BYTE on the wire). */
typedef struct {
  uint64_t call, seq, first_row, count, clean, num_samples, batch, status;
} header;

/* A block sent to a rank, waiting for its answer. */
typedef struct {
  uint64_t call, start, count; /* start: the block's first row in the solver call */
  double since;                /* when the rank could start on it */
} flight;

/* What root knows of one other rank. */
typedef struct {
  flight queue[DEPTH]; /* in the order sent (the rank answers in that order) */
  int inflight;
  char *send[DEPTH]; /* a send buffer per slot, with its request */
  size_t send_bytes[DEPTH];
  MPI_Request request[DEPTH];
  int next_slot;
  uint64_t cancel_id; /* the CANCEL message on its way, with its request */
  MPI_Request cancel;
  int stopped; /* the rank said RESULT_STOPPED */
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
  int serving, ended; /* ended: ENDED_STOPPED (root said stop) or ENDED_FAILED (an MPI failure) */
  size_t *threads; /* each rank's workers */
  size_t all_threads, row_cap; /* row_cap: the most rows a message may carry */
  /* root only */
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

/* Every MPI call of the component holds this lock: one at a time in the process. */
static pthread_mutex_t mpi_lock = PTHREAD_MUTEX_INITIALIZER;
#define LOCKED(rc, call)             \
  do {                               \
    pthread_mutex_lock(&mpi_lock);   \
    (rc) = (call);                   \
    pthread_mutex_unlock(&mpi_lock); \
  } while (0)

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

/* "MPI_Send failed: <MPI's text>" into buf; 1 when rc is an error. */
static int mpi_failed(int rc, const char *what, char *buf, size_t len) {
  if (rc == MPI_SUCCESS) return 0;
  char text[MPI_MAX_ERROR_STRING];
  int n = 0, got;
  LOCKED(got, MPI_Error_string(rc, text, &n));
  if (got != MPI_SUCCESS) snprintf(text, sizeof text, "MPI error %d", rc);
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

static int mpi_usable(void) {
  int finalized = 1, initialized = 0;
  MPI_Finalized(&finalized);
  MPI_Initialized(&initialized);
  return initialized && !finalized;
}

/* 1 when a message of `tag` from `source` is waiting (its status in *st); rc the MPI code. */
static int waiting(MPI_Comm comm, int source, int tag, MPI_Status *st, int *rc) {
  int flag = 0;
  LOCKED(*rc, MPI_Iprobe(source, tag, comm, &flag, st));
  return *rc == MPI_SUCCESS && flag;
}

/* Receives the message whose status is `st` into `h` cut to a header (a longer one is cut,
 * which MPI reports and which still takes it off the queue): 1 when a header came. */
static int drop(MPI_Comm comm, const MPI_Status *st, header *h) {
  int rc, bytes = 0;
  LOCKED(rc, MPI_Get_count(st, MPI_BYTE, &bytes));
  memset(h, 0, sizeof *h);
  LOCKED(rc, MPI_Recv(h, (int)sizeof *h, MPI_BYTE, st->MPI_SOURCE, st->MPI_TAG, comm, MPI_STATUS_IGNORE));
  (void)rc; /* (a cut message is an error to MPI, and expected here) */
  return bytes >= (int)sizeof *h;
}

/* The byte count of the message whose status is `st`. */
static int byte_count(const MPI_Status *st) {
  int rc, bytes = 0;
  LOCKED(rc, MPI_Get_count(st, MPI_BYTE, &bytes));
  return rc == MPI_SUCCESS ? bytes : -1;
}

/* Waits for a non-blocking operation, the MPI lock held only while it is tested (so that
 * a collective waiting for other ranks never stops this process's other MPI users). */
static int finish(MPI_Request *request) {
  int done = 0, rc = MPI_SUCCESS;
  for (unsigned polls = 0;; pause_briefly(++polls)) {
    LOCKED(rc, MPI_Test(request, &done, MPI_STATUS_IGNORE));
    if (rc != MPI_SUCCESS || done) return rc;
  }
}

/* "problem 3, sample 7" (or "unperturbed problem 3") for row `row` of a solver call. */
static void describe_row(const pert_solve_info *info, size_t row, char *buf, size_t len) {
  unsigned long long global = (unsigned long long)(info->first_row + row), n = info->num_samples ? info->num_samples : 1;
  if (info->clean)
    format(buf, len, "unperturbed problem %llu", global);
  else
    format(buf, len, "problem %llu, sample %llu", global / n, global % n);
}

/* Whether the text before `i` in `why` ends with one of the library's own phrases that
 * precede a row's name ("output 3 of ", "cannot solve ", " to "): only those names are
 * the library's (a solver's own message, inside the text, is left as it is). */
static int library_phrase_before(const char *why, size_t i) {
  static const char *phrases[] = {" of ", "cannot solve ", " to "};
  for (size_t p = 0; p < sizeof phrases / sizeof *phrases; p++) {
    size_t k = strlen(phrases[p]);
    if (i >= k && memcmp(why + i - k, phrases[p], k) == 0) {
      if (p > 0) return 1;
      /* " of " only after "output <digits>" */
      size_t j = i - k;
      while (j > 0 && why[j - 1] >= '0' && why[j - 1] <= '9') j--;
      return j < i - k && j >= 7 && memcmp(why + j - 7, "output ", 7) == 0;
    }
  }
  return 0;
}

/* `why` (n bytes) with the library's names of a block's rows, which pert_op_solve counts
 * from 0 as "unperturbed problem k", as "row k of the block" (the block's own rows are
 * named in the message around it). */
static void block_rows_named(const char *why, int n, char *out, size_t len) {
  static const char word[] = "unperturbed problem ";
  const size_t w = sizeof word - 1;
  size_t at = 0, i = 0, end = n > 0 ? (size_t)n : 0;
  while (i < end && at + 1 < len) {
    if (end - i > w && memcmp(why + i, word, w) == 0 && why[i + w] >= '0' && why[i + w] <= '9' &&
        library_phrase_before(why, i)) {
      size_t j = i + w;
      while (j < end && why[j] >= '0' && why[j] <= '9') j++;
      char named[64];
      format(named, sizeof named, "row %.*s of the block", (int)(j - i - w), why + i + w);
      for (const char *p = named; *p && at + 1 < len; p++) out[at++] = *p;
      i = j;
    } else {
      out[at++] = why[i++];
    }
  }
  out[at] = 0;
}

/* The failure of `count` rows from row `start` of the call on rank `rank`, with `why` (the
 * library's own naming of the rows, local to the block, taken off). */
static void block_failed(const ctx *c, int rank, size_t start, size_t count, const char *why, int n, char *msg,
                         size_t len) {
  const char *prefix = "the solver failed on ";
  const char *colon = n > 0 ? memchr(why, ':', (size_t)n) : NULL;
  if (n > (int)strlen(prefix) && strncmp(why, prefix, strlen(prefix)) == 0 && colon && colon + 2 <= why + n)
    n -= (int)(colon + 2 - why), why = colon + 2;
  char first[64], last[64], named[MESSAGE_BYTES];
  describe_row(c->job.info, start, first, sizeof first);
  describe_row(c->job.info, start + count - 1, last, sizeof last);
  block_rows_named(why, n, named, sizeof named);
  format(msg, len, "rank %d%s failed on %s to %s: %s", rank, rank == c->root ? " (root)" : "", first, last, named);
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
  pert_last_error(msg, len);
  return 1;
}

/* ---- root: the driver thread, which solves blocks on root's own workers ------------- */

/* Guided block sizes for a rank of `threads` workers: about (rows left) / (2 * all threads)
 * per worker, at most ROWS_PER_WORKER per worker (so that the timeout, which is per row
 * of a worker, stays short) and what one message carries. */
static size_t block_rows(const ctx *c, size_t left, size_t threads) {
  size_t per = left / (2 * c->all_threads);
  if (per < 1) per = 1;
  if (per > ROWS_PER_WORKER) per = ROWS_PER_WORKER;
  size_t rows = per * threads;
  if (rows > c->row_cap) rows = c->row_cap;
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
      char why[MESSAGE_BYTES], msg[MESSAGE_BYTES];
      int failed = solve_rows(c, &h, j->in + start * c->d, rows, j->out + start * c->o, why, sizeof why);
      if (failed) block_failed(c, c->rank, start, rows, why, (int)strlen(why), msg, sizeof msg);
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
  int slot = p->next_slot, rc;
  LOCKED(rc, MPI_Wait(&p->request[slot], MPI_STATUS_IGNORE)); /* the slot's last send: answered, so done */
  if (mpi_failed(rc, "MPI_Wait", msg, len)) return 1;
  size_t bytes = sizeof(header) + rows * c->d * sizeof(float);
  if (!grow(&p->send[slot], &p->send_bytes[slot], bytes)) {
    format(msg, len, "out of memory for a block of %zu bytes to rank %d", bytes, r);
    return 1;
  }
  header h = {c->calls, start, info->first_row + start, rows, info->clean, info->num_samples, info->batch, 0};
  memcpy(p->send[slot], &h, sizeof h);
  memcpy(p->send[slot] + sizeof h, in + start * c->d, rows * c->d * sizeof(float));
  LOCKED(rc, MPI_Isend(p->send[slot], (int)bytes, MPI_BYTE, r, TAG_WORK, c->comm, &p->request[slot]));
  if (mpi_failed(rc, "MPI_Isend", msg, len)) return 1;
  flight f = {c->calls, start, rows, now()}; /* (a queued block's clock restarts when it starts) */
  p->queue[p->inflight++] = f;
  p->next_slot = (slot + 1) % DEPTH;
  return 0;
}

/* Receives one answer if one has come: 1 when one was handled, 0 when none, -1 on an error
 * of MPI or of the protocol (msg). A failed block of the current call sets *failed and msg. */
static int receive_answer(ctx *c, float *out, int *outstanding, int *failed, char *msg, size_t len) {
  MPI_Status st;
  header h;
  int rc, bytes, whole = 1;
  if (!waiting(c->comm, MPI_ANY_SOURCE, TAG_RESULT, &st, &rc)) return mpi_failed(rc, "MPI_Iprobe", msg, len) ? -1 : 0;
  bytes = byte_count(&st);
  if (bytes < (int)sizeof h || !grow(&c->recv, &c->recv_bytes, (size_t)bytes)) {
    whole = 0; /* too short, or no room: its header is all that is taken */
    if (!drop(c->comm, &st, &h)) {
      format(msg, len, "rank %d sent an answer of %d bytes, shorter than a header", st.MPI_SOURCE, bytes);
      return -1;
    }
  } else {
    LOCKED(rc, MPI_Recv(c->recv, bytes, MPI_BYTE, st.MPI_SOURCE, TAG_RESULT, c->comm, MPI_STATUS_IGNORE));
    if (mpi_failed(rc, "MPI_Recv", msg, len)) return -1;
    memcpy(&h, c->recv, sizeof h);
  }
  peer *p = &c->peers[st.MPI_SOURCE];
  if (h.status == RESULT_STOPPED) {
    p->stopped = 1;
    return 1;
  }
  if (p->inflight == 0 || p->queue[0].call != h.call || p->queue[0].start != h.seq) {
    format(msg, len, "rank %d answered a block it was not given", st.MPI_SOURCE);
    return -1;
  }
  flight f = p->queue[0];
  memmove(p->queue, p->queue + 1, (size_t)(p->inflight - 1) * sizeof(flight));
  p->inflight--;
  if (p->inflight > 0) p->queue[0].since = now(); /* the next block starts now */
  if (h.call != c->calls) return 1;               /* a late answer of a failed call: dropped */
  (*outstanding)--;
  if (whole && h.status == RESULT_OK && (size_t)bytes == sizeof h + f.count * c->o * sizeof(float)) {
    memcpy(out + f.start * c->o, c->recv + sizeof h, f.count * c->o * sizeof(float));
  } else if (!*failed) {
    if (whole && h.status == RESULT_FAILED)
      block_failed(c, st.MPI_SOURCE, f.start, f.count, c->recv + sizeof h, bytes - (int)sizeof h, msg, len);
    else
      format(msg, len, "rank %d's answer of %d bytes to a block of %llu rows could not be taken (%s)", st.MPI_SOURCE,
             bytes, (unsigned long long)f.count, whole ? "a wrong size" : "out of memory");
    *failed = 1;
  }
  return 1;
}

/* Ranks holding blocks of the failed call are told to skip those they have not begun (a
 * non-blocking send from the peer's own buffer; while one is on its way, none is added). */
static void cancel_call(ctx *c) {
  for (int r = 0; r < c->size; r++) {
    peer *p = &c->peers[r];
    int holds = 0, rc, done = 1;
    for (int i = 0; i < p->inflight; i++) holds |= p->queue[i].call == c->calls;
    if (r == c->rank || !holds) continue;
    LOCKED(rc, MPI_Test(&p->cancel, &done, MPI_STATUS_IGNORE));
    if (rc != MPI_SUCCESS || !done) continue;
    p->cancel_id = c->calls;
    LOCKED(rc, MPI_Isend(&p->cancel_id, (int)sizeof p->cancel_id, MPI_BYTE, r, TAG_CANCEL, c->comm, &p->cancel));
  }
}

/* A rank whose head block is of this call and overdue: the longest a block may take is
 * the timeout per row of a worker of its rank. */
static int overdue(const ctx *c, char *msg, size_t len) {
  double t = now();
  for (int r = 0; r < c->size; r++) {
    const peer *p = &c->peers[r];
    if (r == c->rank || p->inflight == 0 || p->queue[0].call != c->calls) continue;
    size_t per_worker = (p->queue[0].count + c->threads[r] - 1) / c->threads[r];
    double limit = c->timeout * (double)per_worker;
    if (t - p->queue[0].since > limit) {
      format(msg, len,
             "rank %d did not answer a block of %llu rows within %g s (remote_timeout %g s per row of a worker): "
             "it is dead or stuck; later calls go on without it until it answers",
             r, (unsigned long long)p->queue[0].count, limit, c->timeout);
      return 1;
    }
  }
  return 0;
}

/* Hands out blocks to the other ranks and collects their answers until the call's rows
 * are all handed out and answered (0), or a rank fails or times out (1, msg). */
static int spread(ctx *c, const pert_solve_info *info, const float *in, float *out, char *msg, size_t len) {
  int outstanding = 0, failed = 0;
  job *j = &c->job;
  for (unsigned polls = 0;; pause_briefly(++polls)) {
    for (int r = 0; r < c->size && !failed; r++) {
      peer *p = &c->peers[r];
      int late = 0; /* a rank still owing answers of a failed call gets no work until it answers */
      for (int i = 0; i < p->inflight; i++) late |= p->queue[i].call != c->calls;
      while (r != c->rank && !late && p->inflight < DEPTH) {
        size_t start = 0, rows = 0;
        pthread_mutex_lock(&c->lock);
        /* a second block waits in a rank's queue only while many rows are left: at the end
         * of the call, the last blocks go to the ranks that are free */
        if (p->inflight == 0 || j->count - j->cursor > 4 * c->all_threads) rows = take(c, c->threads[r], &start);
        pthread_mutex_unlock(&c->lock);
        if (rows == 0) break;
        if (send_block(c, r, info, in, start, rows, msg, len)) {
          failed = 1;
          break;
        }
        outstanding++, polls = 0;
      }
    }
    if (failed) break;
    pthread_mutex_lock(&c->lock);
    int exhausted = j->cursor >= j->count, driver_failed = j->driver_failed;
    if (driver_failed) memcpy(msg, j->driver_message, len < sizeof j->driver_message ? len : sizeof j->driver_message);
    pthread_mutex_unlock(&c->lock);
    if (driver_failed) { /* root's own solver failed: the call fails now, with its message */
      failed = 1;
      break;
    }
    if (outstanding == 0 && exhausted) return 0;
    int got = receive_answer(c, out, &outstanding, &failed, msg, len);
    if (got < 0) {
      failed = 1;
      break;
    }
    if (got)
      polls = 0;
    else if (overdue(c, msg, len))
      failed = 1;
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
  if (failed) j->abort = 1; /* the driver takes no further block (the one it solves, it ends) */
  while (!j->driver_done) pthread_cond_wait(&c->wake, &c->lock);
  j->active = 0;
  if (!failed && j->driver_failed) { /* root's last block failed after the others had answered */
    memcpy(msg, j->driver_message, sizeof msg);
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
  pthread_mutex_destroy(&c->lock);
  pthread_cond_destroy(&c->wake);
  free(c);
}

/* Root's op is freed: the driver stops, root's local op is freed, every rank is told to
 * stop; root takes (and drops) the answers still coming until every rank has said it
 * stopped, or for a bounded time, then frees the communicator. Sends never taken (by a
 * rank that is stuck) are left to MPI, with their buffers. When a rank has not said it
 * stopped (stuck, busy, or not serving yet), root keeps the communicator (a handle): that
 * rank's late messages must find it, not a later communicator that MPI gave its context
 * (which they would disorder: the next MPI_Comm_dup of the job hung). */
static void root_freed(void *data) {
  ctx *c = data;
  if (getpid() != c->pid) return; /* a forked child: not a rank; the parent keeps all */
  pthread_mutex_lock(&c->lock);
  c->quit = 1;
  pthread_cond_broadcast(&c->wake);
  pthread_mutex_unlock(&c->lock);
  if (c->driver_started) pthread_join(c->driver, NULL);
  pert_op_free(c->local);
  int rc, leak = 0;
  if (mpi_usable()) {
    char msg[MESSAGE_BYTES];
    for (int r = 0; r < c->size; r++)
      if (r != c->rank) {
        MPI_Request stop;
        LOCKED(rc, MPI_Isend(NULL, 0, MPI_BYTE, r, TAG_STOP, c->comm, &stop));
        if (rc == MPI_SUCCESS) LOCKED(rc, MPI_Request_free(&stop)); /* (no buffer: nothing to keep) */
      }
    double until = now() + (c->timeout < 5 ? c->timeout : 5) + STOP_GRACE;
    c->calls++; /* every answer still due is late */
    for (unsigned polls = 0;; pause_briefly(++polls)) {
      int running = 0, outstanding = 0, failed = 0;
      for (int r = 0; r < c->size; r++) running |= r != c->rank && !c->peers[r].stopped;
      if (!running || now() > until || receive_answer(c, NULL, &outstanding, &failed, msg, sizeof msg) < 0) break;
    }
    for (int r = 0; r < c->size; r++) {
      peer *p = &c->peers[r];
      for (int s = 0; s <= DEPTH; s++) {
        MPI_Request *request = s < DEPTH ? &p->request[s] : &p->cancel;
        int done = 1;
        LOCKED(rc, MPI_Test(request, &done, MPI_STATUS_IGNORE));
        if (done) continue;
        LOCKED(rc, MPI_Request_free(request)); /* never taken: left to MPI, buffer and all */
        if (s < DEPTH) p->send[s] = NULL;
        else leak = 1; /* (the CANCEL's buffer is in the peers' array) */
      }
    }
    int all_stopped = 1;
    for (int r = 0; r < c->size; r++) all_stopped &= r == c->rank || c->peers[r].stopped;
    if (all_stopped) LOCKED(rc, MPI_Comm_free(&c->comm));
    (void)rc; /* (freeing: errors have nowhere to go) */
  }
  if (leak) c->peers = NULL, c->size = 0;
  free_ctx(c);
}

/* A serving rank's handle is freed (after its workers' fini hooks). */
static void rank_freed(void *data) {
  ctx *c = data;
  if (getpid() != c->pid) return; /* a forked child: the parent's lock may be held; it keeps all */
  unregister(c);
  int rc = MPI_SUCCESS;
  if (mpi_usable()) LOCKED(rc, MPI_Comm_free(&c->comm));
  (void)rc;
  free_ctx(c);
}

/* ---- serving ranks ------------------------------------------------------------------ */

/* 1 when root has said stop (the message stays queued for serve to take). */
static int stopping(ctx *c) {
  MPI_Status st;
  int rc;
  return waiting(c->comm, c->root, TAG_STOP, &st, &rc);
}

/* Starts the answer's send: the header `h` and `extra` bytes after it in *buf. Once root
 * has said stop, no answer goes (root takes none any more). */
static int send_answer(ctx *c, header h, char *buf, size_t extra, MPI_Request *sending, char *msg, size_t len) {
  if (stopping(c)) return 0;
  memcpy(buf, &h, sizeof h);
  int rc;
  LOCKED(rc, MPI_Isend(buf, (int)(sizeof h + extra), MPI_BYTE, c->root, TAG_RESULT, c->comm, sending));
  return mpi_failed(rc, "MPI_Isend", msg, len);
}

/* The failure `text` of block `h` as its answer (serve keeps room for a header and a
 * message in *buf). */
static int answer_failure(ctx *c, header h, const char *text, char *buf, MPI_Request *sending, char *msg,
                          size_t len) {
  size_t n = strlen(text) < MESSAGE_BYTES ? strlen(text) : MESSAGE_BYTES;
  memcpy(buf + sizeof h, text, n);
  h.status = RESULT_FAILED;
  return send_answer(c, h, buf, n, sending, msg, len);
}

/* Solves one block and starts its answer's send (the solutions, or the failure's text). */
static int answer(ctx *c, header h, const float *in, char **buf, size_t *have, MPI_Request *sending, char *msg,
                  size_t len) {
  size_t data = h.count * c->o * sizeof(float);
  if (h.status == RESULT_SKIPPED) return send_answer(c, h, *buf, 0, sending, msg, len);
  if (!grow(buf, have, sizeof h + (data > MESSAGE_BYTES ? data : MESSAGE_BYTES))) {
    char text[128];
    format(text, sizeof text, "out of memory for %zu bytes of solutions", data);
    return answer_failure(c, h, text, *buf, sending, msg, len);
  }
  char text[MESSAGE_BYTES];
  if (solve_rows(c, &h, in, (size_t)h.count, (float *)(void *)(*buf + sizeof h), text, sizeof text))
    return answer_failure(c, h, text, *buf, sending, msg, len);
  return send_answer(c, h, *buf, data, sending, msg, len);
}

/* Takes the block whose status is `st`: 1 with it in *work and *h, 0 when it could not be
 * taken whole (then *h is its header, and *why says why), -1 on an MPI error (msg). */
static int receive_block(ctx *c, const MPI_Status *st, char **work, size_t *have, header *h, char *why, char *msg,
                         size_t len) {
  int bytes = byte_count(st), rc;
  if (bytes < (int)sizeof(header) || !grow(work, have, (size_t)bytes)) {
    format(why, MESSAGE_BYTES, "rank %d had no room for a block of %d bytes", c->rank, bytes);
    return drop(c->comm, st, h) ? 0 : -1;
  }
  LOCKED(rc, MPI_Recv(*work, bytes, MPI_BYTE, c->root, TAG_WORK, c->comm, MPI_STATUS_IGNORE));
  if (mpi_failed(rc, "MPI_Recv", msg, len)) return -1;
  memcpy(h, *work, sizeof *h);
  if ((size_t)bytes != sizeof *h + h->count * c->d * sizeof(float)) {
    format(why, MESSAGE_BYTES, "a block of %d bytes does not hold its %llu rows", bytes, (unsigned long long)h->count);
    return 0;
  }
  return 1;
}

/* The end of the service: blocks still queued are taken and dropped (so that root's sends
 * complete), root is told the service has ended, and the last sends get the grace time to
 * leave (root takes them while it waits for that word); 1 when they have not (their
 * requests are then left to MPI, and the reply buffer must stay). */
static int wind_down(ctx *c, MPI_Request *sending) {
  static const header stopped = {UINT64_MAX, 0, 0, 0, 0, 0, 0, RESULT_STOPPED}; /* (outlives any send) */
  MPI_Status st;
  header dropped;
  MPI_Request requests[2] = {*sending, MPI_REQUEST_NULL};
  int rc, done = 0;
  while (waiting(c->comm, c->root, TAG_WORK, &st, &rc) || waiting(c->comm, c->root, TAG_CANCEL, &st, &rc))
    drop(c->comm, &st, &dropped);
  LOCKED(rc, MPI_Isend(&stopped, (int)sizeof stopped, MPI_BYTE, c->root, TAG_RESULT, c->comm, &requests[1]));
  double until = now() + STOP_GRACE;
  for (unsigned polls = 0; !done && now() < until; pause_briefly(++polls)) {
    while (waiting(c->comm, c->root, TAG_WORK, &st, &rc)) drop(c->comm, &st, &dropped);
    LOCKED(rc, MPI_Testall(2, requests, &done, MPI_STATUSES_IGNORE));
    if (rc != MPI_SUCCESS) break;
  }
  *sending = MPI_REQUEST_NULL;
  if (done) return 0;
  for (int i = 0; i < 2; i++)
    if (requests[i] != MPI_REQUEST_NULL) LOCKED(rc, MPI_Request_free(&requests[i]));
  return 1;
}

static pert_status serve(ctx *c) {
  char msg[MESSAGE_BYTES] = "", why[MESSAGE_BYTES], *work = NULL, *reply = NULL;
  size_t work_bytes = 0, reply_bytes = 0;
  uint64_t cancelled = 0;
  MPI_Request sending = MPI_REQUEST_NULL; /* the last answer, on its way */
  int failed = 0, rc;
  if (!grow(&reply, &reply_bytes, sizeof(header) + MESSAGE_BYTES))
    return pert_set_last_error(PERT_STATUS_TORCH_ERROR, "out of memory for the answers' buffer");
  for (unsigned polls = 0; !failed; pause_briefly(++polls)) {
    MPI_Status st;
    if (stopping(c)) {
      LOCKED(rc, MPI_Recv(NULL, 0, MPI_BYTE, c->root, TAG_STOP, c->comm, MPI_STATUS_IGNORE));
      c->ended = ENDED_STOPPED;
      break;
    }
    while (waiting(c->comm, c->root, TAG_CANCEL, &st, &rc)) {
      uint64_t id = 0;
      LOCKED(rc, MPI_Recv(&id, (int)sizeof id, MPI_BYTE, c->root, TAG_CANCEL, c->comm, MPI_STATUS_IGNORE));
      if (rc == MPI_SUCCESS && id > cancelled) cancelled = id;
    }
    if ((failed = mpi_failed(rc, "MPI_Iprobe", msg, sizeof msg))) break;
    int sent = 1; /* the reply buffer is free once the last answer has left */
    LOCKED(rc, MPI_Test(&sending, &sent, MPI_STATUS_IGNORE));
    if ((failed = mpi_failed(rc, "MPI_Test", msg, sizeof msg))) break;
    if (!sent || !waiting(c->comm, c->root, TAG_WORK, &st, &rc)) {
      failed = mpi_failed(rc, "MPI_Iprobe", msg, sizeof msg);
      continue;
    }
    header h;
    int got = receive_block(c, &st, &work, &work_bytes, &h, why, msg, sizeof msg);
    if ((failed = got < 0)) break;
    if (got == 0) {
      failed = answer_failure(c, h, why, reply, &sending, msg, sizeof msg);
    } else {
      h.status = h.call <= cancelled ? RESULT_SKIPPED : RESULT_OK;
      failed = answer(c, h, (const float *)(void *)(work + sizeof h), &reply, &reply_bytes, &sending, msg, sizeof msg);
    }
    polls = 0;
  }
  if (!wind_down(c, &sending)) free(reply);
  free(work);
  if (!c->ended) c->ended = ENDED_FAILED; /* (root was told the service ended: no second one) */
  return failed ? pert_set_last_error(PERT_STATUS_SOLVER_FAILED, msg) : PERT_STATUS_OK;
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
  pert_status s = c->ended == ENDED_STOPPED ? PERT_STATUS_OK /* (root's op is freed: nothing will come) */
                  : c->ended       ? pert_set_last_error(PERT_STATUS_SOLVER_FAILED,
                                                         "this rank's service ended with an MPI failure: free the op")
                  : mpi_usable() ? serve(c)
                                 : pert_set_last_error(PERT_STATUS_INVALID_ARGUMENT, "MPI is not initialized, or finalized");
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

/* The settings and shapes ranks must agree on, one per line (NULL: out of memory). */
static char *agreed_settings(const pert_config *config, const int64_t *in_shape, size_t in_rank,
                             const int64_t *out_shape, size_t out_rank) {
  size_t n = pert_config_describe(config, NULL, 0), cap = n + 64 + 24 * (in_rank + out_rank), at = 0;
  char *all = malloc(n + 1), *text = malloc(cap);
  if (!all || !text) {
    free(all), free(text);
    return NULL;
  }
  pert_config_describe(config, all, n + 1);
  at += (size_t)snprintf(text + at, cap - at, "input_shape=");
  for (size_t i = 0; i < in_rank; i++) at += (size_t)snprintf(text + at, cap - at, "%lld,", (long long)in_shape[i]);
  at += (size_t)snprintf(text + at, cap - at, "\noutput_shape=");
  for (size_t i = 0; i < out_rank; i++) at += (size_t)snprintf(text + at, cap - at, "%lld,", (long long)out_shape[i]);
  at += (size_t)snprintf(text + at, cap - at, "\n");
  char *rest = NULL;
  for (char *line = strtok_r(all, "\n", &rest); line; line = strtok_r(NULL, "\n", &rest))
    if (!own_setting(line) && at < cap) at += (size_t)snprintf(text + at, cap - at, "%s\n", line);
  free(all);
  return text;
}

/* The first line where `theirs` differs from `mine`, into msg. */
static void first_difference(const char *mine, const char *theirs, int r, int root, char *msg, size_t len) {
  const char *a = mine, *b = theirs;
  while (*a || *b) {
    size_t la = strcspn(a, "\n"), lb = strcspn(b, "\n");
    if (la != lb || strncmp(a, b, la) != 0) {
      format(msg, len, "rank %d's settings differ from root's: %.*s (root %d: %.*s)", r, (int)lb, b, root, (int)la, a);
      return;
    }
    a += la + (a[la] == '\n'), b += lb + (b[lb] == '\n');
  }
  format(msg, len, "rank %d's settings differ from root's", r);
}

/* The lowest rank whose `failed` is set, or -1; -2 when MPI failed (collective). */
static int first_failing(MPI_Comm comm, int failed, int rank, int size) {
  int mine = failed ? rank : size, lowest = size, rc;
  MPI_Request request;
  LOCKED(rc, MPI_Iallreduce(&mine, &lowest, 1, MPI_INT, MPI_MIN, comm, &request));
  if (rc == MPI_SUCCESS) rc = finish(&request);
  return rc != MPI_SUCCESS ? -2 : lowest < size ? lowest : -1;
}

/* A collective started by `start` (with its request), then waited for as `finish` does. */
#define COLLECTIVE(rc, start)                 \
  do {                                        \
    MPI_Request request_;                     \
    LOCKED(rc, start);                        \
    if ((rc) == MPI_SUCCESS) (rc) = finish(&request_); \
  } while (0)

/* Root compares every rank's settings with its own: the verdict, msg. */
static pert_status compare_settings(const ctx *c, const char *all, const int *offsets, const char *settings,
                                    char *msg, size_t len) {
  for (int r = 0; r < c->size; r++)
    if (strcmp(all + offsets[r], settings) != 0) {
      first_difference(settings, all + offsets[r], r, c->root, msg, len);
      return PERT_STATUS_INVALID_ARGUMENT;
    }
  return PERT_STATUS_OK;
}

/* Collective: every rank's local status (the first failing rank's reaches all), then root
 * compares the settings; every rank learns the verdict, and each rank's threads. Every
 * collective is non-blocking, waited for without holding the MPI lock. */
static pert_status handshake(ctx *c, pert_status status, const char *settings, char *msg, size_t len) {
  int rc, bad = first_failing(c->comm, status != PERT_STATUS_OK, c->rank, c->size);
  long long verdict[2] = {status, (long long)strlen(msg) + 1}; /* status, message length */
  if (bad == -2) {
    format(msg, len, "MPI failed in the ranks' handshake");
    return PERT_STATUS_SOLVER_FAILED;
  }
  if (bad >= 0) { /* that rank tells everyone why */
    COLLECTIVE(rc, MPI_Ibcast(verdict, 2, MPI_LONG_LONG, bad, c->comm, &request_));
    if (rc == MPI_SUCCESS) COLLECTIVE(rc, MPI_Ibcast(msg, (int)verdict[1], MPI_CHAR, bad, c->comm, &request_));
    if (mpi_failed(rc, "the ranks' handshake", msg, len)) return PERT_STATUS_SOLVER_FAILED;
    char why[MESSAGE_BYTES];
    format(why, sizeof why, "rank %d: %s", bad, msg);
    format(msg, len, "%s", why);
    return (pert_status)verdict[0];
  }
  /* every rank is ready: root gathers the settings (scratch room from local_part) */
  int mine = (int)strlen(settings) + 1, *sizes = (int *)(void *)c->recv, *offsets = sizes + c->size, total = 0;
  COLLECTIVE(rc, MPI_Igather(&mine, 1, MPI_INT, sizes, 1, MPI_INT, c->root, c->comm, &request_));
  if (c->rank == c->root)
    for (int r = 0; r < c->size; r++) offsets[r] = total, total += sizes[r];
  char *all = c->rank == c->root ? malloc((size_t)(total > 0 ? total : 1)) : NULL;
  int no_room = c->rank == c->root && !all;
  if (rc == MPI_SUCCESS) COLLECTIVE(rc, MPI_Ibcast(&no_room, 1, MPI_INT, c->root, c->comm, &request_));
  if (rc == MPI_SUCCESS && !no_room)
    COLLECTIVE(rc, MPI_Igatherv(settings, mine, MPI_CHAR, all, sizes, offsets, MPI_CHAR, c->root, c->comm, &request_));
  verdict[0] = PERT_STATUS_OK;
  if (c->rank == c->root && rc == MPI_SUCCESS && !no_room)
    verdict[0] = compare_settings(c, all, offsets, settings, msg, len);
  if (no_room) verdict[0] = PERT_STATUS_TORCH_ERROR, format(msg, len, "rank %d (root): out of memory", c->root);
  verdict[1] = verdict[0] == PERT_STATUS_OK ? 0 : (long long)strlen(msg) + 1;
  free(all);
  if (rc == MPI_SUCCESS) COLLECTIVE(rc, MPI_Ibcast(verdict, 2, MPI_LONG_LONG, c->root, c->comm, &request_));
  if (rc == MPI_SUCCESS && verdict[1] > 0)
    COLLECTIVE(rc, MPI_Ibcast(msg, (int)verdict[1], MPI_CHAR, c->root, c->comm, &request_));
  if (rc == MPI_SUCCESS && verdict[0] == PERT_STATUS_OK) {
    unsigned long long threads = c->threads[c->rank], *each = (unsigned long long *)(void *)c->recv;
    COLLECTIVE(rc, MPI_Iallgather(&threads, 1, MPI_UNSIGNED_LONG_LONG, each, 1, MPI_UNSIGNED_LONG_LONG, c->comm,
                                  &request_));
    for (int r = 0; r < c->size && rc == MPI_SUCCESS; r++) c->threads[r] = each[r] ? (size_t)each[r] : 1;
  }
  if (mpi_failed(rc, "the ranks' handshake", msg, len)) return PERT_STATUS_SOLVER_FAILED;
  return (pert_status)verdict[0];
}

/* Reads the timeout from the config's description. */
static double config_timeout(const pert_config *config) {
  char text[4096];
  pert_config_describe(config, text, sizeof text);
  const char *t = strstr(text, "\nremote_timeout=");
  return t ? strtod(t + 16, NULL) : 60.0;
}

static size_t numel(const int64_t *shape, size_t rank) {
  size_t n = 1;
  for (size_t i = 0; i < rank; i++) n *= shape[i] > 0 ? (size_t)shape[i] : 0;
  return n;
}

/* Root's op: the one the user gets (one worker, `dispatch`), and the driver thread. */
static pert_status make_root(ctx *c, const pert_config *config, const int64_t *in_shape, size_t in_rank,
                             const int64_t *out_shape, size_t out_rank, pert_op **op) {
  pert_config *one = NULL;
  pert_status s = pert_config_clone(config, &one);
  if (s == PERT_STATUS_OK) s = pert_config_set_threads(one, 1);
  if (s == PERT_STATUS_OK) s = pert_op_new_ex(one, in_shape, in_rank, out_shape, out_rank, dispatch, c, NULL, NULL, op);
  pert_config_free(one);
  if (s == PERT_STATUS_OK) {
    c->driver_started = pthread_create(&c->driver, NULL, drive, c) == 0;
    if (!c->driver_started) s = pert_set_last_error(PERT_STATUS_TORCH_ERROR, "cannot start the driver thread");
  }
  return s;
}

/* This rank's own checks, its local op, its buffers (and root's op): a status, msg. */
static pert_status local_part(ctx *c, const pert_config *config, const int64_t *in_shape, size_t in_rank,
                              const int64_t *out_shape, size_t out_rank, pert_op **out, pert_op **root_op,
                              char *msg, size_t len) {
  int level = MPI_THREAD_SINGLE, rc;
  LOCKED(rc, MPI_Query_thread(&level));
  (void)rc;
  pert_status s = PERT_STATUS_OK;
  char text[128];
  format(text, sizeof text, "root %d is not a rank of comm (size %d)", c->root, c->size);
  if (c->root < 0 || c->root >= c->size) s = pert_set_last_error(PERT_STATUS_INVALID_ARGUMENT, text);
  else if (!out) s = pert_set_last_error(PERT_STATUS_NULL_ARGUMENT, "out is NULL");
  else if (!config) s = pert_set_last_error(PERT_STATUS_NULL_ARGUMENT, "config is NULL");
  else if (!c->solver) s = pert_set_last_error(PERT_STATUS_NULL_ARGUMENT, "solver is NULL");
  else if (level < MPI_THREAD_SERIALIZED)
    s = pert_set_last_error(PERT_STATUS_INVALID_ARGUMENT,
                            "the MPI thread level is below MPI_THREAD_SERIALIZED: initialize MPI with "
                            "MPI_Init_thread(&argc, &argv, MPI_THREAD_SERIALIZED, &provided)");
  else
    s = pert_op_new_ex(config, in_shape, in_rank, out_shape, out_rank, solve_block, c, init_worker, fini_worker,
                       &c->local);
  if (s == PERT_STATUS_OK) {
    c->d = numel(in_shape, in_rank), c->o = numel(out_shape, out_rank);
    size_t row = (c->d > c->o ? c->d : c->o) * sizeof(float);
    if (row > MAX_MESSAGE_BYTES - sizeof(header))
      s = pert_set_last_error(PERT_STATUS_INVALID_ARGUMENT, "a row takes more than 64 MiB: too large for one block");
    c->row_cap = (MAX_MESSAGE_BYTES - sizeof(header)) / (row ? row : 1);
    c->timeout = config_timeout(config);
  }
  if (s == PERT_STATUS_OK) { /* (recv: also the handshake's scratch of 2 ints and a size_t a rank) */
    c->threads = calloc((size_t)c->size, sizeof *c->threads);
    c->peers = calloc((size_t)c->size, sizeof *c->peers);
    if (!c->threads || !c->peers || !grow(&c->recv, &c->recv_bytes, (size_t)c->size * 16 + 64))
      s = pert_set_last_error(PERT_STATUS_TORCH_ERROR, "out of memory for the MPI component's state");
    else
      for (int r = 0; r < c->size; r++) c->threads[r] = r == c->rank ? pert_op_solver_threads(c->local) : 1;
  }
  if (s == PERT_STATUS_OK && c->rank == c->root)
    s = make_root(c, config, in_shape, in_rank, out_shape, out_rank, root_op);
  if (s != PERT_STATUS_OK) pert_last_error(msg, len);
  return s;
}

static void undo(ctx *c, pert_op *root_op) {
  pert_op_free(root_op); /* (its hook is not set yet) */
  if (c->driver_started) {
    pthread_mutex_lock(&c->lock);
    c->quit = 1;
    pthread_cond_broadcast(&c->wake);
    pthread_mutex_unlock(&c->lock);
    pthread_join(c->driver, NULL);
  }
  pert_op_free(c->local);
  int rc = MPI_SUCCESS;
  if (c->comm != MPI_COMM_NULL) LOCKED(rc, MPI_Comm_free(&c->comm));
  (void)rc;
  free_ctx(c);
}

/* Checks that need no communication, the same on every rank of a valid `comm`. */
static pert_status comm_checks(MPI_Comm comm, int *rank, int *size) {
  int inter = 0;
  int rc;
  if (!mpi_usable()) return pert_set_last_error(PERT_STATUS_INVALID_ARGUMENT, "MPI is not initialized, or finalized");
  if (comm == MPI_COMM_NULL) return pert_set_last_error(PERT_STATUS_INVALID_ARGUMENT, "comm is MPI_COMM_NULL");
  LOCKED(rc, MPI_Comm_test_inter(comm, &inter));
  if (inter) return pert_set_last_error(PERT_STATUS_INVALID_ARGUMENT, "comm is an intercommunicator");
  LOCKED(rc, MPI_Comm_size(comm, size));
  LOCKED(rc, MPI_Comm_rank(comm, rank));
  (void)rc;
  return PERT_STATUS_OK;
}

pert_status pert_mpi_op_new(const pert_config *config, const int64_t *input_shape, size_t input_rank,
                            const int64_t *output_shape, size_t output_rank, MPI_Comm comm, int root,
                            pert_solver_ex solver, void *user_data, pert_worker_init init, pert_worker_fini fini,
                            pert_op **out) {
  int size = 0, rank = 0, rc;
  pert_status s = comm_checks(comm, &rank, &size);
  if (s != PERT_STATUS_OK) return s;
  ctx *c = calloc(1, sizeof *c);
  if (!c) return pert_set_last_error(PERT_STATUS_TORCH_ERROR, "out of memory for the MPI component's state");
  c->solver = solver, c->user_data = user_data, c->init = init, c->fini = fini;
  c->rank = rank, c->size = size, c->root = root, c->pid = getpid(), c->comm = MPI_COMM_NULL;
  pthread_mutex_init(&c->lock, NULL);
  pthread_cond_init(&c->wake, NULL);
  char msg[MESSAGE_BYTES] = "";
  COLLECTIVE(rc, MPI_Comm_idup(comm, &c->comm, &request_));
  if (rc == MPI_SUCCESS) LOCKED(rc, MPI_Comm_set_errhandler(c->comm, MPI_ERRORS_RETURN));
  int roots[2] = {-root, root}, agreed[2] = {0, 0}; /* every rank names the same root */
  if (rc == MPI_SUCCESS) COLLECTIVE(rc, MPI_Iallreduce(roots, agreed, 2, MPI_INT, MPI_MAX, c->comm, &request_));
  if (mpi_failed(rc, "MPI_Comm_dup", msg, sizeof msg) || -agreed[0] != agreed[1]) {
    if (rc == MPI_SUCCESS) format(msg, sizeof msg, "the ranks name different roots (%d to %d)", -agreed[0], agreed[1]);
    undo(c, NULL);
    return pert_set_last_error(rc == MPI_SUCCESS ? PERT_STATUS_INVALID_ARGUMENT : PERT_STATUS_SOLVER_FAILED, msg);
  }
  pert_op *root_op = NULL;
  s = local_part(c, config, input_shape, input_rank, output_shape, output_rank, out, &root_op, msg, sizeof msg);
  char *settings = s == PERT_STATUS_OK ? agreed_settings(config, input_shape, input_rank, output_shape, output_rank)
                                       : NULL;
  if (s == PERT_STATUS_OK && !settings)
    s = PERT_STATUS_TORCH_ERROR, format(msg, sizeof msg, "out of memory for the settings");
  s = handshake(c, s, settings ? settings : "", msg, sizeof msg);
  free(settings);
  if (s != PERT_STATUS_OK) {
    undo(c, root_op);
    return pert_set_last_error(s, msg);
  }
  for (int r = 0; r < size; r++) {
    c->all_threads += c->threads[r];
    for (int k = 0; k < DEPTH; k++) c->peers[r].request[k] = MPI_REQUEST_NULL;
    c->peers[r].cancel = MPI_REQUEST_NULL;
  }
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
