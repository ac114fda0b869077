/* The C solver of the benchmark's callback case, as a shared library for ctypes: the
 * shortest path on the 9-node graph of the examples. */
#include "../examples/c/graph.h"

int32_t bench_shortest_path(void *user_data, const float *costs, size_t count, float *on_path) {
  return shortest_path(user_data, costs, count, on_path);
}

size_t bench_edges(void) { return EDGES; }

const float *bench_costs(void) { return COST; }
