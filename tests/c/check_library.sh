#!/bin/sh
# The shared library links as promised: SONAME libperturbations.so.0 (the major), a RUNPATH to
# libtorch, and libtorch_cuda really linked (not dropped by --as-needed) when libtorch
# ships it, so that CUDA works where a GPU exists; and only pert_* symbols exported.
set -eu
lib="$1"
dyn=$(readelf -d "$lib")
fail() { echo "FAIL: $*"; echo "$dyn"; exit 1; }
echo "$dyn" | grep -q 'SONAME.*\[libperturbations\.so\.0\]' || fail "no SONAME libperturbations.so.0"
runpath=$(echo "$dyn" | sed -n 's/.*RUNPATH.*\[\(.*\)\]/\1/p')
[ -n "$runpath" ] || fail "no RUNPATH"
torch_lib=""
for dir in $(echo "$runpath" | tr ':' ' '); do
  [ -f "$dir/libtorch_cpu.so" ] && torch_lib="$dir"
done
[ -n "$torch_lib" ] || fail "RUNPATH $runpath holds no libtorch_cpu.so"
if [ -f "$torch_lib/libtorch_cuda.so" ]; then
  echo "$dyn" | grep -q 'NEEDED.*\[libtorch_cuda\.so\]' || fail "libtorch_cuda.so not in NEEDED"
fi
# only pert_* in the dynamic symbol table: nothing that could collide with other libraries
exported=$(nm -D --defined-only "$lib" | awk '{print $3}')
[ -n "$exported" ] || fail "no exported symbols"
others=$(echo "$exported" | grep -v '^pert_' || true)
[ -z "$others" ] || fail "exports symbols other than pert_*: $others"
echo "$exported" | grep -qx 'pert_forward' || fail "pert_forward is not exported"
echo "ok: SONAME, RUNPATH $torch_lib, libtorch_cuda $( [ -f "$torch_lib/libtorch_cuda.so" ] && echo linked || echo 'absent (CPU-only libtorch)')"
