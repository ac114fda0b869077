#!/bin/sh
# make install into a temporary prefix; build and run consumers with pkg-config and with
# CMake's find_package; check the installed SONAME and links.
set -eu
ROOT="$1"
PREFIX=$(mktemp -d)
BUILD=$(mktemp -d)
trap 'rm -rf "$PREFIX" "$BUILD"' EXIT
make -s -C "$ROOT" install-files PREFIX="$PREFIX"
# the full-version file, the SONAME link (major.minor before 1.0) and the development link
test -f "$PREFIX/lib/libperturbations.so.0.1.0" && test -L "$PREFIX/lib/libperturbations.so.0.1"
test -L "$PREFIX/lib/libperturbations.so"
readelf -d "$PREFIX/lib/libperturbations.so" | grep -q 'SONAME.*\[libperturbations\.so\.0\.1\]'
# a second, incompatible 0.x installs beside it: the first's SONAME link still names it
(cd "$BUILD" && TORCH_LIB= sh "$ROOT/packaging/install.sh" "$PREFIX" "$ROOT" 0.2.0 >/dev/null)
test "$(readlink "$PREFIX/lib/libperturbations.so.0.1")" = libperturbations.so.0.1.0
test "$(readlink "$PREFIX/lib/libperturbations.so.0.2")" = libperturbations.so.0.2.0
rm -f "$PREFIX"/lib/libperturbations*.so.0.2*
make -s -C "$ROOT" install-files PREFIX="$PREFIX" # (this version's files and links again)
test -f "$PREFIX/include/perturbations_torch.hpp"
# a relative prefix is made absolute (the .pc files carry it: pkg-config's flags must work
# from anywhere)
(cd "$BUILD" && TORCH_LIB= sh "$ROOT/packaging/install.sh" relative "$ROOT" 0.1.0 >/dev/null)
grep -q "^prefix=$BUILD/relative\$" "$BUILD/relative/lib/pkgconfig/perturbations.pc"
rm -rf "$BUILD/relative"
export PKG_CONFIG_PATH="$PREFIX/lib/pkgconfig"
cc -std=c11 -Wall -Werror "$ROOT/tests/install/consumer.c" -o "$BUILD/pc_consumer" \
  $(pkg-config --cflags --libs perturbations) -Wl,-rpath,"$PREFIX/lib"
"$BUILD/pc_consumer"
# the static library, libtorch shared: its link line from pkg-config (perturbations-static,
# and the complete Libs.private of perturbations)
pkg-config --static --libs perturbations | grep -q -- '-ltorch_cpu -lc10 -lstdc++'
cc -std=c11 -Wall -Werror "$ROOT/tests/install/consumer.c" -o "$BUILD/static_consumer" \
  $(pkg-config --cflags --libs perturbations-static)
if readelf -d "$BUILD/static_consumer" | grep -q 'NEEDED.*libperturbations'; then
  echo "static_consumer needs libperturbations.so: the static link line took the shared library"; exit 1
fi
"$BUILD/static_consumer"
cmake -S "$ROOT/tests/install" -B "$BUILD/cmake" -DCMAKE_PREFIX_PATH="$PREFIX" -DCMAKE_BUILD_RPATH="$PREFIX/lib" >/dev/null
cmake --build "$BUILD/cmake" >/dev/null
"$BUILD/cmake/consumer"
"$BUILD/cmake/consumer_cpp"
# the consumers record the SONAME, not a build path
readelf -d "$BUILD/cmake/consumer" | grep -q 'NEEDED.*\[libperturbations\.so\.0\.1\]'
readelf -d "$BUILD/pc_consumer" | grep -q 'NEEDED.*\[libperturbations\.so\.0\.1\]'

# where the installed library looks for libtorch: the build's libtorch by default, or
# TORCH_LIB at install time
built=$(readelf -d "$ROOT/target/release/libperturbations.so" | sed -n 's/.*RUNPATH.*\[\(.*\)\]/\1/p')
readelf -d "$PREFIX/lib/libperturbations.so" | grep -q "RUNPATH.*\[$built\]"
torch_lib=""
for dir in $(echo "$built" | tr ':' ' '); do [ -f "$dir/libtorch_cpu.so" ] && torch_lib="$dir"; done
OTHER=$(mktemp -d)
trap 'rm -rf "$PREFIX" "$BUILD" "$OTHER"' EXIT
ln -s "$torch_lib" "$OTHER/torchlib"
make -s -C "$ROOT" install-files PREFIX="$OTHER/prefix" TORCH_LIB="$OTHER/torchlib" >/dev/null
readelf -d "$OTHER/prefix/lib/libperturbations.so" | grep -q "RUNPATH.*\[$OTHER/torchlib\]"
cc -std=c11 -Wall -Werror "$ROOT/tests/install/consumer.c" -o "$BUILD/other_consumer" \
  -I"$OTHER/prefix/include" -L"$OTHER/prefix/lib" -lperturbations -Wl,-rpath,"$OTHER/prefix/lib"
"$BUILD/other_consumer"

# a libtorch consumer through perturbations::torch (find_package(Torch) needs a usable
# TorchConfig: a CUDA build of libtorch asks for the CUDA toolkit)
if [ -n "${TORCH_CMAKE:-}" ]; then
  if cmake -S "$ROOT/tests/install/torch" -B "$BUILD/torch" -DCMAKE_PREFIX_PATH="$PREFIX;$TORCH_CMAKE" \
       -DCMAKE_BUILD_RPATH="$PREFIX/lib" >"$BUILD/torch.log" 2>&1; then
    cmake --build "$BUILD/torch" >/dev/null
    "$BUILD/torch/consumer_torch"
  elif grep -q "uses CUDA but I cannot find the CUDA" "$BUILD/torch.log"; then
    echo "SKIPPED libtorch consumer: this libtorch is a CUDA build whose TorchConfig needs the CUDA toolkit"
  else
    cat "$BUILD/torch.log"; exit 1
  fi
fi
# the MPI component, where the build has it: pkg-config with mpicc, and CMake's COMPONENTS mpi
if [ -f "$ROOT/target/release/libperturbations_mpi.so" ]; then
  test -L "$PREFIX/lib/libperturbations_mpi.so" && test -f "$PREFIX/include/perturbations_mpi.h"
  readelf -d "$PREFIX/lib/libperturbations_mpi.so" | grep -q 'SONAME.*\[libperturbations_mpi\.so\.0\.1\]'
  run_mpi="mpirun $( [ "$(id -u)" = 0 ] && echo --allow-run-as-root ) --oversubscribe -np 2"
  mpicc -std=c11 -Wall -Werror "$ROOT/tests/install/mpi/consumer_mpi.c" -o "$BUILD/pc_consumer_mpi" \
    $(pkg-config --cflags --libs perturbations-mpi) -Wl,-rpath,"$PREFIX/lib"
  timeout 120 $run_mpi "$BUILD/pc_consumer_mpi"
  cmake -S "$ROOT/tests/install/mpi" -B "$BUILD/cmake-mpi" -DCMAKE_PREFIX_PATH="$PREFIX" \
    -DCMAKE_BUILD_RPATH="$PREFIX/lib" >/dev/null
  cmake --build "$BUILD/cmake-mpi" >/dev/null
  timeout 120 $run_mpi "$BUILD/cmake-mpi/consumer_mpi"
else
  echo "SKIPPED the installed MPI component: this build has none (make mpi)"
fi
echo "install consumers: ok (pkg-config, CMake, SONAME links, TORCH_LIB)"
