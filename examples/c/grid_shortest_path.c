/* The solver of the synthetic shortest-path benchmark of decision-focused learning: a
 * 5x5 grid of nodes, 40 edges that move right or down, from the top-left node to the
 * bottom-right one; edges are numbered as GRID_EDGE_RIGHT and GRID_EDGE_DOWN say. The path of least
 * total cost is found by dynamic programming over the grid (a DAG, so negative perturbed
 * costs are fine); its 0/1 edge indicator is the solution.
 *
 * Built as a shared library (target/examples/libgrid_shortest_path.so) that the Python
 * example loads with ctypes and passes to the library as a C function pointer, and
 * included by the C++ examples.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#define GRID 5
#define GRID_EDGES (2 * GRID * (GRID - 1))
/* right edge of node (i, j), j < GRID-1: the first 20; down edge of (i, j), i < GRID-1: the next 20 */
#define GRID_EDGE_RIGHT(i, j) ((i) * (GRID - 1) + (j))
#define GRID_EDGE_DOWN(i, j) (GRID * (GRID - 1) + (i) * GRID + (j))

size_t grid_edges(void) { return GRID_EDGES; }

/* One path: costs[GRID_EDGES] -> path[GRID_EDGES] (0/1), returns the path's cost. */
double grid_solve_one(const float *costs, float *path) {
  double best[GRID][GRID];
  int from_left[GRID][GRID];
  for (int i = 0; i < GRID; i++)
    for (int j = 0; j < GRID; j++) {
      if (i == 0 && j == 0) {
        best[i][j] = 0;
        from_left[i][j] = 0;
        continue;
      }
      double left = j > 0 ? best[i][j - 1] + costs[GRID_EDGE_RIGHT(i, j - 1)] : 1e300;
      double up = i > 0 ? best[i - 1][j] + costs[GRID_EDGE_DOWN(i - 1, j)] : 1e300;
      from_left[i][j] = left <= up;
      best[i][j] = left <= up ? left : up;
    }
  for (int e = 0; e < GRID_EDGES; e++) path[e] = 0.0f;
  for (int i = GRID - 1, j = GRID - 1; i > 0 || j > 0;) {
    if (from_left[i][j]) {
      path[GRID_EDGE_RIGHT(i, j - 1)] = 1.0f;
      j--;
    } else {
      path[GRID_EDGE_DOWN(i - 1, j)] = 1.0f;
      i--;
    }
  }
  return best[GRID - 1][GRID - 1];
}

/* The library's solver callback: `count` cost vectors in, their shortest paths out. */
int32_t grid_shortest_path(void *user_data, const float *costs, size_t count, float *paths) {
  (void)user_data;
  for (size_t r = 0; r < count; r++) {
    const float *c = costs + r * GRID_EDGES;
    for (int e = 0; e < GRID_EDGES; e++)
      if (!isfinite(c[e])) return 1;
    grid_solve_one(c, paths + r * GRID_EDGES);
  }
  return 0;
}
