#!/bin/sh
# bench/mpi_scale.c over np = 1, 2, 4 and 8 ranks (oversubscribed: the solver sleeps), one
# worker per rank: a Markdown table (README, "On a cluster"). Run by `make bench-mpi`.
set -eu
BIN="$1"; shift
echo "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(nproc) cores; a solver sleeping 2 ms per row:"
echo
echo "| ranks | threads per rank | rows per call | time (ms) | ideal (ms) | time / ideal | overhead per call (us) | overhead per row, instant solver (us) |"
echo "|---|---|---|---|---|---|---|---|"
for np in 1 2 4 8; do
  timeout 300 mpirun "$@" -np "$np" "$BIN" 1
done
