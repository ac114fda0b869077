#!/usr/bin/env bash
# The GPU check (issues 15 and 33), meant for the device machine: libtorch_cuda loaded on
# demand, libtorch's current stream, graph capture, racing threads, other CUDA contexts
# and hidden devices (tests/gpu/streams.py) and the c10 stream ABI, the closed-form C
# harness and the Rust comparison of CUDA ops with the CPU on device "cuda", the rest of
# the C and Rust tests on a machine that has a GPU, and the GPU table (bench/gpu.py). Needs the files of `make gpu-files` (built elsewhere, carried
# here) and the machine's python3 with torch. Writes the table to $OUT/gpu_table.md when
# OUT is set.
#
# Exit status: 0 when every check ran and passed; 1 when one failed or could not run (a
# missing program is a failure, not a skip, and so is a machine with an NVIDIA driver whose
# python3 has no torch or whose torch sees no device: a broken CUDA is what this checks);
# 77 when this machine has no NVIDIA driver, saying that nothing was checked.
# The programs run with PERT_REQUIRE_GPU=1, under which a test that finds no device fails
# instead of passing unchecked.
set -uo pipefail
cd "$(dirname "$0")/.."
driver=no
if [ -e /proc/driver/nvidia/version ] || [ -e /dev/nvidiactl ] || command -v nvidia-smi >/dev/null 2>&1; then
  driver=yes
fi
TORCH_LIB=$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null || true)
if [ -z "$TORCH_LIB" ]; then
  if [ $driver = no ]; then
    echo "== perturbations GPU check on $(hostname): no NVIDIA driver (and python3 has no torch): nothing was checked"
    exit 77
  fi
  echo "== perturbations GPU check on $(hostname): FAILED: an NVIDIA driver is present, but python3 has no torch"
  exit 1
fi
# the test programs' RUNPATHs name the build machine's folders: find both libraries here
soname=$(sed -n 's/^version = "\([0-9]*\)\.\([0-9]*\)\..*/\1 \2/p' Cargo.toml | head -1 |
  awk '{ print "libperturbations.so." ($1 == 0 ? $1 "." $2 : $1) }')
[ -e "target/release/$soname" ] || ln -sf libperturbations.so "target/release/$soname"
export LD_LIBRARY_PATH="$PWD/target/release:${TORCH_LIB}:${LD_LIBRARY_PATH:-}"
export PERT_REQUIRE_GPU=1
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
echo "== perturbations GPU check on $(hostname): ${gpus} CUDA device(s)"
if [ "${gpus}" = 0 ]; then
  if [ $driver = no ]; then
    echo "no NVIDIA driver: nothing was checked"
    exit 77
  fi
  echo "FAILED: an NVIDIA driver is present, but torch sees no CUDA device; the library's report:"
  PYTHONPATH="$PWD/bindings/python" PERTURBATIONS_LIB="$PWD/target/release/libperturbations.so" \
    python3 -c 'import perturbations; print(perturbations.device_report())' 2>&1 || true
  exit 1
fi
nvidia-smi -L 2>/dev/null || python3 -c 'import torch; print("GPU:", torch.cuda.get_device_name(0))'
failed=()
check() {  # check NAME SECONDS COMMAND...: runs it; records a failure (a missing program too)
  local name=$1 limit=$2
  shift 2
  echo "-- $name"
  local program="" arg
  for arg in "$@"; do  # the program: the first word that is neither env nor NAME=VALUE
    [[ "$arg" == env || "$arg" == *=* ]] && continue
    program=$arg
    break
  done
  if ! command -v "$program" >/dev/null 2>&1; then
    echo "   ($name: FAILED: $program is missing: run make gpu-files and carry target/)"
    failed+=("$name")
    return
  fi
  local t0=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "   ($name: exit $rc, $((SECONDS - t0)) s)"
  [ $rc = 0 ] || failed+=("$name")
}
# first, before anything else loads CUDA into a process: the on-demand loading
check cuda_loading 120 env PERT_EXPECT_CUDA_DEVICES="$gpus" target/ctest/test_cuda_loading
# the current stream, graph capture, racing threads, a non-primary context, hidden devices
check "streams, graph capture, contexts (tests/gpu/streams.py)" 300 env PYTHONPATH="$PWD/bindings/python" \
  PERTURBATIONS_LIB="$PWD/target/release/libperturbations.so" python3 tests/gpu/streams.py
check "c10 stream ABI" 60 target/ctest/test_c10_stream_abi
for t in test_oracles test_estimators test_scale test_device_torch; do
  check "$t on cuda" 180 env PERT_TEST_DEVICE=cuda "target/ctest/$t"
done
check "rust: CUDA ops and the noise kernel equal the CPU" 180 target/gpu-tests/scale on_a_gpu --nocapture
[ -f target/bench/libbench_solvers.so ] || { echo "-- GPU table: FAILED: target/bench/libbench_solvers.so is missing"; failed+=("GPU table"); }
[ -f target/bench/libbench_solvers.so ] &&
  check "GPU table" 360 env PYTHONUNBUFFERED=1 python3 bench/gpu.py --out "${OUT:-target/bench}/gpu_table.md"
for t in perturbations estimators reliability rust_api scale pinned; do  # (the Makefile's GPU_RUST_TESTS)
  check "rust $t (a GPU machine)" 240 "target/gpu-tests/$t" --test-threads 8 -q
done
for t in test_api test_threads test_overlap test_solver_ex test_cpp test_cpp20 test_torch; do
  check "$t (a GPU machine)" 180 "target/ctest/$t"
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "== FAILED: ${failed[*]}"
  exit 1
fi
echo "== all GPU checks passed"
