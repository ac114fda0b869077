#!/usr/bin/env bash
# The GPU check (issue 15), meant for the device machine: libtorch_cuda loaded on demand,
# the closed-form C harness and the Rust comparison of CUDA ops with the CPU on device
# "cuda", the rest of the C and Rust tests on a machine that has a GPU, and the GPU table
# (bench/gpu.py). Needs the files of `make gpu-files` (built elsewhere, carried here) and
# the machine's python3 with torch. Writes the table to $OUT/gpu_table.md when OUT is set.
# On a machine without a GPU it says so and skips.
set -uo pipefail
cd "$(dirname "$0")/.."
TORCH_LIB=$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null || true)
# the test programs' RUNPATHs name the build machine's folders: find both libraries here
soname=$(sed -n 's/^version = "\([0-9]*\)\.\([0-9]*\)\..*/\1 \2/p' Cargo.toml | head -1 |
  awk '{ print "libperturbations.so." ($1 == 0 ? $1 "." $2 : $1) }')
[ -e "target/release/$soname" ] || ln -sf libperturbations.so "target/release/$soname"
export LD_LIBRARY_PATH="$PWD/target/release:${TORCH_LIB}:${LD_LIBRARY_PATH:-}"
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
echo "== perturbations GPU check on $(hostname): ${gpus} CUDA device(s)"
if [ "${gpus}" = 0 ]; then
  echo "no GPU found: skipping the CUDA checks (they need a machine with a GPU)"
  exit 0
fi
nvidia-smi -L 2>/dev/null || python3 -c 'import torch; print("GPU:", torch.cuda.get_device_name(0))'
failed=()
check() {  # check NAME SECONDS COMMAND...: runs it, records a failure
  local name=$1 limit=$2
  shift 2
  echo "-- $name"
  local t0=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "   ($name: exit $rc, $((SECONDS - t0)) s)"
  [ $rc = 0 ] || failed+=("$name")
}
# first, before anything else loads CUDA into a process: the on-demand loading
check cuda_loading 120 env PERT_EXPECT_CUDA_DEVICES="$gpus" target/ctest/test_cuda_loading
for t in test_oracles test_estimators test_scale test_device_torch; do
  check "$t on cuda" 180 env PERT_TEST_DEVICE=cuda "target/ctest/$t"
done
[ -x target/gpu-tests/scale ] && check "rust: CUDA ops and the noise kernel equal the CPU" 180 target/gpu-tests/scale on_a_gpu --nocapture
if [ -f target/bench/libbench_solvers.so ]; then
  check "GPU table" 360 env PYTHONUNBUFFERED=1 python3 bench/gpu.py --out "${OUT:-target/bench}/gpu_table.md"
fi
if [ -d target/gpu-tests ]; then
  for t in target/gpu-tests/*; do
    check "rust $(basename "$t") (a GPU machine)" 240 "$t" --test-threads 8 -q
  done
fi
for t in test_api test_threads test_overlap test_solver_ex test_cpp test_cpp20 test_torch; do
  [ -x "target/ctest/$t" ] && check "$t (a GPU machine)" 180 "target/ctest/$t"
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "== FAILED: ${failed[*]}"
  exit 1
fi
echo "== all GPU checks passed"
