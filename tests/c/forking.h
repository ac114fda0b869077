/* A child process forked while other threads work: the parent gives it 20 s, then prints
 * the stacks of its threads (where gdb is found) and kills it, and tells how it ended.
 * Includers define _GNU_SOURCE (or _POSIX_C_SOURCE 200809L) before any include. */
#ifndef PERT_TEST_FORKING_H
#define PERT_TEST_FORKING_H

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/prctl.h>
#endif

typedef enum { CHILD_OK, CHILD_HUNG, CHILD_FAILED } child_end;

/* The stacks of every thread of a hung process, on stderr (where gdb is on PATH; within
 * 60 s). */
static inline void print_stacks(pid_t pid) {
  char command[256];
  snprintf(command, sizeof command,
           "command -v gdb >/dev/null && timeout 60 gdb -p %d -batch -nx -ex 'thread apply all bt' 1>&2",
           (int)pid);
  fprintf(stderr, "  a child hung; the stacks of its threads:\n");
  if (system(command) != 0) fprintf(stderr, "  (no stacks: gdb was not found or could not attach)\n");
}

/* Forks; the child runs body(arg) and exits with what it returns; the parent waits for it
 * up to 20 s (a child still running then is CHILD_HUNG: its stacks are printed, and it is
 * killed). A failed fork or a child's non-zero exit is CHILD_FAILED (said on stderr). */
static inline child_end fork_and_wait(int (*body)(void *), void *arg) {
  pid_t parent = getpid();
  pid_t child = fork();
  (void)parent; /* (read only on Linux) */
  if (child < 0) {
    perror("  fork");
    return CHILD_FAILED;
  }
  if (child == 0) {
#if defined(__linux__)
    prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY); /* (Yama: gdb, not an ancestor, may attach) */
    prctl(PR_SET_PDEATHSIG, SIGKILL);          /* (no orphan if the parent dies) */
    if (getppid() != parent) _exit(4);         /* (it died before that) */
#endif
    alarm(120); /* (and no child outlives a parent stuck in gdb) */
    _exit(body(arg));
  }
  int status = 0;
  for (int waited_ms = 0;; waited_ms++) {
    pid_t ended = waitpid(child, &status, WNOHANG);
    if (ended == child) break;
    if (ended != 0) {
      perror("  waitpid");
      return CHILD_FAILED;
    }
    if (waited_ms == 20000) {
      print_stacks(child);
      kill(child, SIGKILL);
      while (waitpid(child, &status, 0) < 0 && errno == EINTR) {
      }
      return CHILD_HUNG;
    }
    nanosleep(&(struct timespec){.tv_sec = 0, .tv_nsec = 1000000}, NULL);
  }
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return CHILD_OK;
  fprintf(stderr, "  a child ended with %s %d\n", WIFEXITED(status) ? "exit status" : "signal",
          WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
  return CHILD_FAILED;
}

#endif
