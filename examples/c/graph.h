/* The 9-node directed graph of the shortest-path examples, and the solver handed to the
 * library as a callback: the shortest path from node 0 to node 8 as edge indicators. */
#ifndef PERT_EXAMPLE_GRAPH_H
#define PERT_EXAMPLE_GRAPH_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "perturbations.h"

#define NODES 9
#define EDGES 13
#define SOURCE 0
#define TARGET 8

static const int FROM[EDGES] = {0, 0, 0, 2, 2, 3, 7, 6, 6, 5, 4, 1, 1};
static const int TO[EDGES] = {2, 3, 1, 3, 7, 7, 6, 8, 5, 4, 8, 5, 4};
static const float COST[EDGES] = {0.2f, 0.25f, 0.9f, 0.1f, 0.2f, 0.15f, 0.2f, 0.4f, 0.1f, 0.1f, 0.1f, 0.6f, 0.6f};
enum { E68 = 7, E65 = 8, E54 = 9, E48 = 10 };

/* Shortest path from SOURCE to TARGET by Bellman-Ford (exact on this acyclic graph, even
 * when the noise makes a cost negative); output: 1 on the edges of the path, else 0. */
static inline int32_t shortest_path(void *user_data, const float *costs, size_t count, float *on_path) {
  (void)user_data;
  for (size_t r = 0; r < count; r++) {
    const float *c = costs + r * EDGES;
    double dist[NODES];
    int via[NODES];
    for (int v = 0; v < NODES; v++) dist[v] = INFINITY, via[v] = -1;
    dist[SOURCE] = 0;
    for (int round = 0; round < NODES - 1; round++)
      for (int e = 0; e < EDGES; e++)
        if (dist[FROM[e]] + c[e] < dist[TO[e]]) dist[TO[e]] = dist[FROM[e]] + c[e], via[TO[e]] = e;
    float *y = on_path + r * EDGES;
    memset(y, 0, EDGES * sizeof *y);
    for (int v = TARGET; v != SOURCE; v = FROM[via[v]]) {
      if (via[v] < 0) return 1; /* unreachable: cannot happen on this graph */
      y[via[v]] = 1.0f;
    }
  }
  return 0;
}

/* Exits with the library's message when a call fails. */
static inline void check(pert_status status, const char *what) {
  if (status != PERT_STATUS_OK) {
    char msg[512];
    pert_last_error(msg, sizeof msg);
    fprintf(stderr, "%s failed: %s: %s\n", what, pert_status_name(status), msg);
    exit(1);
  }
}

#endif
