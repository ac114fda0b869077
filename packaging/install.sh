#!/bin/sh
# Installs the built library under PREFIX: lib/libperturbations.so.VERSION with the links
# libperturbations.so.ABI (the SONAME: the major, and before 1.0 major.minor, so that two
# incompatible versions install side by side) and
# libperturbations.so, lib/libperturbations.a, include/perturbations.h,
# perturbations.hpp and perturbations_torch.hpp, a pkg-config file and a CMake package; and
# the MPI component (libperturbations_mpi.so.VERSION and its links, perturbations_mpi.h,
# perturbations-mpi.pc) when `make mpi` built it.
# Run by `make install`.
#
# libtorch: the installed library looks for it in its RUNPATH, which is the libtorch the
# library was built against (printed at the end). TORCH_LIB=/path/to/libtorch/lib sets
# another (with patchelf; a relative path is made absolute, a path starting with $ORIGIN
# stays relative to the installed library); an empty RUNPATH (TORCH_LIB=none) leaves it
# to the system (ldconfig, LD_LIBRARY_PATH).
set -eu
PREFIX="$1"; ROOT="$2"; VERSION="$3"
major=${VERSION%%.*}; rest=${VERSION#*.}; minor=${rest%%.*}
if [ "$major" = 0 ]; then soversion="0.$minor"; else soversion="$major"; fi
mkdir -p "$PREFIX"
PREFIX=$(CDPATH= cd -- "$PREFIX" && pwd) # (absolute: the .pc files carry it; a relative one worked only from here)
lib="$PREFIX/lib"
mkdir -p "$lib/pkgconfig" "$lib/cmake/perturbations" "$PREFIX/include"
so="$lib/libperturbations.so.$VERSION"
install -m 755 "$ROOT/target/release/libperturbations.so" "$so"
ln -sf "libperturbations.so.$VERSION" "$lib/libperturbations.so.$soversion"
ln -sf "libperturbations.so.$soversion" "$lib/libperturbations.so"
if [ -n "${TORCH_LIB:-}" ]; then
  command -v patchelf >/dev/null || { echo "TORCH_LIB needs patchelf (apt-get install patchelf)"; exit 1; }
  case "$TORCH_LIB" in
    none) patchelf --remove-rpath "$so" ;;
    '$ORIGIN'*) patchelf --set-rpath "$TORCH_LIB" "$so" ;;  # relative to the installed library
    *)
      [ -f "$TORCH_LIB/libtorch_cpu.so" ] || { echo "TORCH_LIB=$TORCH_LIB holds no libtorch_cpu.so"; exit 1; }
      patchelf --set-rpath "$(cd "$TORCH_LIB" && pwd)" "$so" ;;  # absolute, wherever make ran
  esac
fi
install -m 644 "$ROOT/target/release/libperturbations.a" "$lib/libperturbations.a"
install -m 644 "$ROOT/include/perturbations.h" "$PREFIX/include/perturbations.h"
install -m 644 "$ROOT/bindings/cpp/perturbations.hpp" "$PREFIX/include/perturbations.hpp"
install -m 644 "$ROOT/bindings/cpp/perturbations_torch.hpp" "$PREFIX/include/perturbations_torch.hpp"
# the MPI component, where `make mpi` built it (with the MPI of that machine)
mpi_so="$ROOT/target/release/libperturbations_mpi.so"
if [ -f "$mpi_so" ]; then
  install -m 755 "$mpi_so" "$lib/libperturbations_mpi.so.$VERSION"
  ln -sf "libperturbations_mpi.so.$VERSION" "$lib/libperturbations_mpi.so.$soversion"
  ln -sf "libperturbations_mpi.so.$soversion" "$lib/libperturbations_mpi.so"
  install -m 644 "$ROOT/bindings/mpi/perturbations_mpi.h" "$PREFIX/include/perturbations_mpi.h"
fi
runpath=$(readelf -d "$so" | sed -n 's/.*R\(UN\)*PATH.*\[\(.*\)\]/\2/p')
# libtorch for a static link (pkg-config --static, perturbations-static.pc): the directory
# of the RUNPATH that holds libtorch_cpu.so, with an rpath to it; none: the system's
torch_link=""
for dir in $(echo "$runpath" | tr ':' ' '); do
  case "$dir" in
    '$ORIGIN'*) dir="$lib${dir#\$ORIGIN}" ;;
  esac
  if [ -f "$dir/libtorch_cpu.so" ]; then torch_link="-L$dir -Wl,-rpath,$dir"; fi
done
subst() { sed -e "s|@PREFIX@|$PREFIX|g" -e "s|@VERSION@|$VERSION|g" -e "s|@VERSION_MAJOR@|$major|g" -e "s|@VERSION_MINOR@|$minor|g" -e "s|@SOVERSION@|$soversion|g" -e "s|@TORCH_LINK@|$torch_link|g" "$1" > "$2"; }
subst "$ROOT/packaging/perturbations.pc.in" "$lib/pkgconfig/perturbations.pc"
subst "$ROOT/packaging/perturbations-static.pc.in" "$lib/pkgconfig/perturbations-static.pc"
subst "$ROOT/packaging/perturbationsConfig.cmake.in" "$lib/cmake/perturbations/perturbationsConfig.cmake"
subst "$ROOT/packaging/perturbationsConfigVersion.cmake.in" "$lib/cmake/perturbations/perturbationsConfigVersion.cmake"
if [ -f "$mpi_so" ]; then
  subst "$ROOT/packaging/perturbations-mpi.pc.in" "$lib/pkgconfig/perturbations-mpi.pc"
  echo "installed the MPI component (libperturbations_mpi, perturbations_mpi.h, perturbations-mpi.pc, CMake COMPONENTS mpi)"
fi
echo "installed perturbations $VERSION under $PREFIX; libtorch is looked for in: ${runpath:-the system's library path (no RUNPATH)}"
