#!/bin/sh
# bench/mpi_scale.c over np = 1, 2, 4 and 8 ranks (oversubscribed: the solver sleeps), one
# worker per rank: a Markdown table (README, "On a cluster"). Run by `make bench-mpi`.
set -eu
BIN="$1"; shift
echo "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(nproc) cores; 320 rows a call, a solver sleeping 2 ms per row, 1 worker a rank:"
echo
echo "| ranks | time (ms) | ideal (ms) | time / ideal | overhead per call (ms) | per row, instant solver (µs) |"
echo "|---|---|---|---|---|---|"
for np in 1 2 4 8; do
  timeout 300 mpirun "$@" -np "$np" "$BIN" 1
done
