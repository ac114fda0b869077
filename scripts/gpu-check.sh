#!/usr/bin/env bash
# The GPU check (issue 5), meant for the device machine: the closed-form C harness on
# device "cuda" and the benchmark on the GPU, printed as one report. Needs the files of a
# `make ctest` and `make bench` build and the device's python3 with torch.
# On a machine without a GPU it says so and skips.
set -uo pipefail
cd "$(dirname "$0")/.."
TORCH_LIB=$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null || true)
export LD_LIBRARY_PATH="${TORCH_LIB}:${LD_LIBRARY_PATH:-}"
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
echo "== perturbations GPU check on $(hostname): ${gpus} CUDA device(s)"
if [ "${gpus}" = 0 ]; then
  echo "no GPU found: skipping the CUDA checks (they need a machine with a GPU)"
  exit 0
fi
python3 -c 'import torch; print("GPU:", torch.cuda.get_device_name(0))'
status=0
for t in test_oracles test_estimators test_scale test_device_torch; do
  echo "-- $t on cuda"
  PERT_TEST_DEVICE=cuda "target/ctest/$t" || status=1
done
echo "-- benchmark on cuda"
python3 bench/bench.py --device cuda || status=1
exit $status
