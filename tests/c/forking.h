/* A child process forked while other threads work: the parent gives it 20 s, then prints
 * the stacks of its threads (where gdb is found) and kills it, and tells how it ended. */
#ifndef PERT_TEST_FORKING_H
#define PERT_TEST_FORKING_H

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

typedef enum { CHILD_OK, CHILD_HUNG, CHILD_FAILED } child_end;

/* The stacks of every thread of a hung process, on stderr (where gdb is on PATH). */
static inline void print_stacks(pid_t pid) {
  char command[160];
  snprintf(command, sizeof command,
           "command -v gdb >/dev/null && gdb -p %d -batch -nx -ex 'thread apply all bt' 1>&2 2>/dev/null",
           (int)pid);
  fprintf(stderr, "  a child hung; the stacks of its threads:\n");
  if (system(command) != 0) fprintf(stderr, "  (no stacks: gdb was not found or could not attach)\n");
}

/* Forks; the child runs body(arg) and exits with what it returns; the parent waits for it
 * up to 20 s (a child still running then is CHILD_HUNG: its stacks are printed, and it is
 * killed). A failed fork or a child's non-zero exit is CHILD_FAILED (said on stderr). */
static inline child_end fork_and_wait(int (*body)(void *), void *arg) {
  pid_t child = fork();
  if (child < 0) return CHILD_FAILED;
  if (child == 0) _exit(body(arg));
  int status = 0;
  for (int waited_ms = 0;; waited_ms++) {
    pid_t ended = waitpid(child, &status, WNOHANG);
    if (ended == child) break;
    if (ended != 0) return CHILD_FAILED;
    if (waited_ms == 20000) {
      print_stacks(child);
      kill(child, SIGKILL);
      waitpid(child, &status, 0);
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
