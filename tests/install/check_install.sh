#!/bin/sh
# make install into a temporary prefix; build and run consumers with pkg-config and with
# CMake's find_package; check the installed SONAME and links.
set -eu
ROOT="$1"
PREFIX=$(mktemp -d)
BUILD=$(mktemp -d)
trap 'rm -rf "$PREFIX" "$BUILD"' EXIT
make -s -C "$ROOT" install-files PREFIX="$PREFIX"
test -L "$PREFIX/lib/libperturbations.so"
readelf -d "$PREFIX/lib/libperturbations.so" | grep -q 'SONAME.*\[libperturbations\.so\]'
export PKG_CONFIG_PATH="$PREFIX/lib/pkgconfig"
cc -std=c11 -Wall -Werror "$ROOT/tests/install/consumer.c" -o "$BUILD/pc_consumer" \
  $(pkg-config --cflags --libs perturbations) -Wl,-rpath,"$PREFIX/lib"
"$BUILD/pc_consumer"
cmake -S "$ROOT/tests/install" -B "$BUILD/cmake" -DCMAKE_PREFIX_PATH="$PREFIX" -DCMAKE_BUILD_RPATH="$PREFIX/lib" >/dev/null
cmake --build "$BUILD/cmake" >/dev/null
"$BUILD/cmake/consumer"
"$BUILD/cmake/consumer_cpp"
# the consumers record the SONAME, not a build path
readelf -d "$BUILD/cmake/consumer" | grep -q 'NEEDED.*\[libperturbations\.so\]'
echo "install consumers: ok (pkg-config and CMake)"
