#!/bin/sh
# Installs the built library under PREFIX: lib/libperturbations.so.VERSION with the
# libperturbations.so link (the SONAME), lib/libperturbations.a, include/perturbations.h
# and perturbations.hpp, a pkg-config file and a CMake package. Run by `make install`.
set -eu
PREFIX="$1"; ROOT="$2"; VERSION="$3"
major=${VERSION%%.*}; rest=${VERSION#*.}; minor=${rest%%.*}
lib="$PREFIX/lib"
mkdir -p "$lib/pkgconfig" "$lib/cmake/perturbations" "$PREFIX/include"
install -m 755 "$ROOT/target/release/libperturbations.so" "$lib/libperturbations.so.$VERSION"
ln -sf "libperturbations.so.$VERSION" "$lib/libperturbations.so"
install -m 644 "$ROOT/target/release/libperturbations.a" "$lib/libperturbations.a"
install -m 644 "$ROOT/include/perturbations.h" "$PREFIX/include/perturbations.h"
install -m 644 "$ROOT/bindings/cpp/perturbations.hpp" "$PREFIX/include/perturbations.hpp"
subst() { sed -e "s|@PREFIX@|$PREFIX|g" -e "s|@VERSION@|$VERSION|g" -e "s|@VERSION_MAJOR@|$major|g" -e "s|@VERSION_MINOR@|$minor|g" "$1" > "$2"; }
subst "$ROOT/packaging/perturbations.pc.in" "$lib/pkgconfig/perturbations.pc"
subst "$ROOT/packaging/perturbationsConfig.cmake.in" "$lib/cmake/perturbations/perturbationsConfig.cmake"
subst "$ROOT/packaging/perturbationsConfigVersion.cmake.in" "$lib/cmake/perturbations/perturbationsConfigVersion.cmake"
echo "installed perturbations $VERSION under $PREFIX"
