#!/bin/sh
# The shared library links as promised: SONAME libperturbations.so.0.1 (before 1.0 the
# major and the minor: 0.1 and 0.2 are incompatible), a RUNPATH to
# libtorch, libtorch_cuda not linked (it is loaded at run time where a CUDA driver exists:
# tests/c/test_cuda_loading.c), and only pert_* symbols exported.
set -eu
lib="$1"
dyn=$(readelf -d "$lib")
fail() { echo "FAIL: $*"; echo "$dyn"; exit 1; }
echo "$dyn" | grep -q 'SONAME.*\[libperturbations\.so\.0\.1\]' || fail "no SONAME libperturbations.so.0.1"
runpath=$(echo "$dyn" | sed -n 's/.*RUNPATH.*\[\(.*\)\]/\1/p')
[ -n "$runpath" ] || fail "no RUNPATH"
torch_lib=""
for dir in $(echo "$runpath" | tr ':' ' '); do
  [ -f "$dir/libtorch_cpu.so" ] && torch_lib="$dir"
done
[ -n "$torch_lib" ] || fail "RUNPATH $runpath holds no libtorch_cpu.so"
if echo "$dyn" | grep -q 'NEEDED.*\[lib\(torch_cuda\|c10_cuda\|torch\)\.so\]'; then
  fail "libtorch_cuda, libc10_cuda or libtorch (which needs libtorch_cuda) in NEEDED: CPU-only processes would map them"
fi
# only pert_* in the dynamic symbol table: nothing that could collide with other libraries
exported=$(nm -D --defined-only "$lib" | awk '{print $3}')
[ -n "$exported" ] || fail "no exported symbols"
others=$(echo "$exported" | grep -v '^pert_' || true)
[ -z "$others" ] || fail "exports symbols other than pert_*: $others"
echo "$exported" | grep -qx 'pert_forward' || fail "pert_forward is not exported"
echo "ok: SONAME, RUNPATH $torch_lib, libtorch_cuda loaded on demand ($( [ -f "$torch_lib/libtorch_cuda.so" ] && echo present || echo 'absent: CPU-only libtorch'))"
