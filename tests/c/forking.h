/* A child process forked while other threads work: it runs a body under an alarm, so that
 * a hang ends as SIGALRM, and the parent tells how it ended. */
#ifndef PERT_TEST_FORKING_H
#define PERT_TEST_FORKING_H

#include <signal.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

typedef enum { CHILD_OK, CHILD_HUNG, CHILD_FAILED } child_end;

/* Forks; the child runs body(arg) (within 20 s) and exits with what it returns; the parent
 * waits for it. A failed fork or a child's non-zero exit is CHILD_FAILED (said on stderr). */
static inline child_end fork_and_wait(int (*body)(void *), void *arg) {
  pid_t child = fork();
  if (child < 0) return CHILD_FAILED;
  if (child == 0) {
    alarm(20); /* a hang ends as SIGALRM */
    _exit(body(arg));
  }
  int status = 0;
  if (waitpid(child, &status, 0) != child) return CHILD_FAILED;
  if (WIFSIGNALED(status) && WTERMSIG(status) == SIGALRM) return CHILD_HUNG;
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return CHILD_OK;
  fprintf(stderr, "  a child ended with %s %d\n", WIFEXITED(status) ? "exit status" : "signal",
          WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
  return CHILD_FAILED;
}

#endif
