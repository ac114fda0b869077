# Entry points: `make demo`, `make test` (see README.md). Everything missing is installed
# on first use: torch==2.11.0 in a venv under $(PERT_CACHE) (default ~/.cache/perturbations),
# and cmake, a C/C++ compiler and pkg-config through apt-get. A user's own libtorch 2.11 is
# used instead when LIBTORCH is set.

SHELL := /bin/bash
PERT_CACHE ?= $(HOME)/.cache/perturbations
TORCH_VERSION := 2.11.0
VENV := $(PERT_CACHE)/venv
TORCH_STAMP := $(VENV)/.torch-$(TORCH_VERSION)
BUILD_DIR := target/release
CTEST_DIR := target/ctest

ifdef LIBTORCH
  TORCH_DEP :=
  CARGO_ENV := LIBTORCH=$(LIBTORCH)
else
  TORCH_DEP := $(TORCH_STAMP)
  CARGO_ENV := PATH="$(VENV)/bin:$$PATH" LIBTORCH_USE_PYTORCH=1
endif
CARGO := $(CARGO_ENV) cargo

CFLAGS_STRICT := -std=c11 -Wall -Wextra -Werror -O2
CXXFLAGS_STRICT := -std=c++17 -Wall -Wextra -Werror -O2
LINK_PERT := -Iinclude -L$(BUILD_DIR) -lperturbations -Wl,-rpath,$(abspath $(BUILD_DIR)) -lm

# libtorch's C++ headers and libraries, for the libtorch adapter (bindings/cpp).
ifdef LIBTORCH
  TORCH_DIR := $(LIBTORCH)
  TORCH_ABI := 1
else
  TORCH_DIR = $(shell "$(VENV)/bin/python" -c 'import torch, os; print(os.path.dirname(torch.__file__))' 2>/dev/null)
  TORCH_ABI = $(shell "$(VENV)/bin/python" -c 'import torch; print(int(torch.compiled_with_cxx11_abi()))' 2>/dev/null)
endif
TORCH_CXX = -D_GLIBCXX_USE_CXX11_ABI=$(TORCH_ABI) -isystem $(TORCH_DIR)/include -isystem $(TORCH_DIR)/include/torch/csrc/api/include
TORCH_LINK = -L$(TORCH_DIR)/lib -ltorch -ltorch_cpu -lc10 -Wl,-rpath,$(TORCH_DIR)/lib

.PHONY: mpi mpi-lib mpi-python bench-mpi bench-methods bench-pool lint readme-blocks nightly sweeps fault miri tsan gpu-files glpk-tools glpk-example predict-then-optimize python-package python-test python-example python-install-check readme-python bench-python cargo-test-debug check-deep clang-tools sanitizers valgrind fuzz julia-test install install-files bench all build test demo header tools mpi-tools torch clean cargo-test ctest examples mpi-example

all: build

# --- installs -------------------------------------------------------------
tools:
	@missing=""; \
	command -v cmake >/dev/null || missing="$$missing cmake"; \
	command -v cc >/dev/null || missing="$$missing gcc"; \
	command -v c++ >/dev/null || missing="$$missing g++"; \
	command -v pkg-config >/dev/null || missing="$$missing pkg-config"; \
	command -v make >/dev/null || missing="$$missing make"; \
	if [ -n "$$missing" ]; then \
	  echo "installing with apt-get:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

# Open MPI for the two-phase example that spreads solves over ranks (make test runs it).
mpi-tools:
	@if ! command -v mpicc >/dev/null || ! command -v mpirun >/dev/null; then \
	  echo "installing Open MPI with apt-get"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  ($$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null) \
	    || echo "Open MPI could not be installed: the MPI example will be skipped"; \
	fi

# GLPK for the MILP example (make test runs it).
glpk-tools:
	@if [ ! -f /usr/include/glpk.h ]; then \
	  echo "installing GLPK (libglpk-dev) with apt-get"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq libglpk-dev >/dev/null; \
	fi

torch: $(TORCH_DEP)

$(TORCH_STAMP):
	@echo "installing torch==$(TORCH_VERSION) into $(VENV) (once; about 4.6 GB)"
	python3 -m venv "$(VENV)"
	"$(VENV)/bin/pip" install --quiet --disable-pip-version-check "torch==$(TORCH_VERSION)"
	touch "$@"

# --- build ----------------------------------------------------------------
MAJOR := $(shell sed -n 's/^version = "\([0-9]*\)\..*/\1/p' Cargo.toml | head -1)
MINOR := $(shell sed -n 's/^version = "[0-9]*\.\([0-9]*\)\..*/\1/p' Cargo.toml | head -1)
# The version the SONAMEs carry: the major, and before 1.0 the minor too (0.1 and 0.2
# are incompatible: cargo-c's rule; build.rs and packaging/install.sh follow it)
SOVERSION := $(if $(filter 0,$(MAJOR)),$(MAJOR).$(MINOR),$(MAJOR))
build: tools $(TORCH_DEP)
	$(CARGO) build --release
	@test -f $(BUILD_DIR)/libperturbations.so && test -f $(BUILD_DIR)/libperturbations.a
	@ln -sf libperturbations.so $(BUILD_DIR)/libperturbations.so.$(SOVERSION)  # the SONAME, as installed

# The code gates (make test, so CI): formatting, clippy with every warning an error (no
# library function over 100 lines: clippy.toml, src/lib.rs), and the docs of every item,
# private ones included, with broken links as errors.
lint: tools $(TORCH_DEP)
	@for c in clippy rustfmt; do cargo $$c --version >/dev/null 2>&1 || rustup component add $$c; done
	$(CARGO) fmt --check
	$(CARGO) clippy --release --all-targets -- -D warnings
	RUSTDOCFLAGS=-Dwarnings $(CARGO) doc --release --no-deps --document-private-items

header: $(TORCH_DEP)
	PERT_UPDATE_HEADER=1 $(CARGO) test --release --test header

# --- tests ----------------------------------------------------------------
test: build lint cargo-test cargo-test-debug ctest readme-blocks mpi-example glpk-example predict-then-optimize julia-test python-test mpi-python
	@echo "make test: all suites passed"

# The Python package (bindings/python), installed into the torch venv with pip as a user
# would (pip compiles the library with cargo against that venv's torch and bundles it), its
# pytest suite run against that installed copy with no variable set, a fresh venv's install
# and a wheel, and its training example.
# (With LIBTORCH set there is no venv of ours: all are skipped.)
PY_FRESH := target/python-fresh

ifdef LIBTORCH
python-package python-test python-example python-install-check readme-python bench-python:
	@echo "SKIPPED $@: LIBTORCH is set (the Python package runs in the torch venv the Makefile makes)"
else
python-package: build
	"$(VENV)/bin/pip" install --quiet --disable-pip-version-check numpy pytest pyepo==2.2.7
	"$(VENV)/bin/pip" install --quiet --disable-pip-version-check --no-deps --force-reinstall ./bindings/python

python-test: python-package
	cd target && env -u PERTURBATIONS_LIB PERT_REQUIRE_PYEPO=1 "$(VENV)/bin/python" -m pytest -q -p no:cacheprovider ../bindings/python/tests
	$(MAKE) --no-print-directory python-install-check
	$(MAKE) --no-print-directory readme-python
	$(MAKE) --no-print-directory python-example

# The README's Python blocks: the `python` group's scripts (scripts/readme_blocks.py run,
# outside the repository, against the installed package), and the walkthrough (the block
# that starts `# walkthrough:`), run as printed from another folder; its test regret must
# have fallen well below the untrained model's (0.49).
readme-python: python-package
	README_PYTHON="$(VENV)/bin/python" python3 scripts/readme_blocks.py run python --expect 'grad'
	@mkdir -p target/readme
	awk '/^```python$$/{on=1; buf=""; next} on && /^```$$/{if (buf ~ /^# walkthrough:/) {printf "%s", buf; exit} on=0; next} on {buf = buf $$0 "\n"}' \
	  README.md > target/readme/walkthrough.py
	@test -s target/readme/walkthrough.py || { echo "no walkthrough block in README.md"; exit 1; }
	cd /tmp && env -u PERTURBATIONS_LIB "$(VENV)/bin/python" "$(abspath target/readme/walkthrough.py)" | tee "$(abspath target/readme/walkthrough.out)"
	@"$(VENV)/bin/python" -c 'import sys; r = float(open(sys.argv[1]).read().split(":")[-1]); \
	  assert r < 0.2, f"walkthrough regret {r} (untrained 0.49)"; print("walkthrough regret", r, "< 0.2")' target/readme/walkthrough.out

# `pip install ./bindings/python` in a fresh venv (torch reached through a .pth file, as
# a second install of torch would take minutes), then `import perturbations` with no
# variable set from another folder; `pip wheel` bundles the library; the source tree
# stays as git has it.
python-install-check: python-package
	rm -rf $(PY_FRESH) && mkdir -p $(PY_FRESH)/wheels
	python3 -m venv $(PY_FRESH)/venv
	"$(VENV)/bin/python" -c 'import site; print(site.getsitepackages()[0])' \
	  > "$$($(PY_FRESH)/venv/bin/python -c 'import site; print(site.getsitepackages()[0])')/torch-venv.pth"
	before="$$(git status --porcelain --ignored=no)"; \
	$(PY_FRESH)/venv/bin/pip install --quiet --disable-pip-version-check ./bindings/python && \
	"$(VENV)/bin/pip" wheel --quiet --disable-pip-version-check --no-deps -w $(PY_FRESH)/wheels ./bindings/python && \
	after="$$(git status --porcelain --ignored=no)" && \
	if [ "$$before" != "$$after" ]; then echo "pip changed the source tree:"; echo "$$after"; exit 1; fi
	cd /tmp && env -u PERTURBATIONS_LIB "$(abspath $(PY_FRESH))/venv/bin/python" -c \
	  'import perturbations as pt, os; p = pt.library_path(); assert "site-packages" in p and os.path.isfile(p), p; print("fresh venv:", p)'
	"$(VENV)/bin/python" -c 'import sys, zipfile; names = zipfile.ZipFile(sys.argv[1]).namelist(); \
	  assert "perturbations/libperturbations.so" in names, names; print("wheel:", sys.argv[1])' $(PY_FRESH)/wheels/perturbations-*.whl

# Python against C for one training step (bench/python_vs_c.py): the installed package
# against the same calls from C (bench/loss_step.c).
bench-python: python-package
	@mkdir -p target/bench
	cc -std=c11 -O2 bench/loss_step.c examples/c/grid_shortest_path.c -o target/bench/loss_step $(LINK_PERT)
	cc -std=c11 -O2 -shared -fPIC examples/c/grid_shortest_path.c -o target/bench/libgrid_shortest_path.so -lm
	cd target && env -u PERTURBATIONS_LIB "$(VENV)/bin/python" ../bench/python_vs_c.py bench/loss_step bench/libgrid_shortest_path.so \
	  | tee bench/python_vs_c.md

# Predict-then-optimize from Python: torch.nn.Linear trained through the Fenchel-Young loss
# of a C shortest-path solver loaded with ctypes (prints the test regret per epoch).
python-example: python-package
	@mkdir -p target/examples
	cc $(CFLAGS_STRICT) -shared -fPIC examples/c/grid_shortest_path.c -o target/examples/libgrid_shortest_path.so
	env -u PERTURBATIONS_LIB "$(VENV)/bin/python" \
	  examples/python/shortest_path_training.py --solver target/examples/libgrid_shortest_path.so
endif

# The Julia package's tests, where julia is installed (it cannot be installed from the
# registries this project uses); tests/julia_binding.rs checks the binding statically always.
julia-test: build
	@if command -v julia >/dev/null; then \
	  PERTURBATIONS_LIB="$(abspath $(BUILD_DIR))/libperturbations.so" julia --project=bindings/julia/Perturbations \
	    -e 'using Pkg; Pkg.instantiate(); Pkg.test(julia_args=["--threads=2"])'; \
	else \
	  echo "SKIPPED julia-test: julia is not on PATH (tests/julia_binding.rs checked the binding statically)"; \
	fi

# The MPI component (bindings/mpi): libperturbations_mpi.so, compiled with this machine's
# mpicc (MPI implementations are not ABI-compatible: build it with the MPI you run).
MPICC ?= mpicc
MPI_LIB := $(BUILD_DIR)/libperturbations_mpi.so
MPIRUN_FLAGS := $(if $(filter 0,$(shell id -u)),--allow-run-as-root) --oversubscribe
HAVE_MPI = command -v $(MPICC) >/dev/null && command -v mpirun >/dev/null
LINK_MPI := -Ibindings/mpi $(LINK_PERT) -lperturbations_mpi
mpi: mpi-tools
	@$(MAKE) --no-print-directory mpi-lib

# (without installing MPI: `make install` builds the component where an MPI is at hand)
mpi-lib: build
	@if $(HAVE_MPI); then \
	  echo "$(MPICC): building $(MPI_LIB)"; \
	  $(MPICC) $(CFLAGS_STRICT) -fPIC -shared -Wl,-soname,libperturbations_mpi.so.$(SOVERSION) -Iinclude \
	    bindings/mpi/perturbations_mpi.c -o $(MPI_LIB) -L$(BUILD_DIR) -lperturbations \
	    -Wl,-rpath,'$$ORIGIN' -lpthread && \
	  ln -sf libperturbations_mpi.so $(BUILD_DIR)/libperturbations_mpi.so.$(SOVERSION); \
	else \
	  echo "SKIPPED the MPI component: $(MPICC)/mpirun not found"; \
	fi

# The MPI component's tests over 3 ranks (tests/mpi/test_mpi.c: equality with one process,
# a remote failure, a stuck rank's timeout, settings that differ), then the examples: the
# two-phase API over 2 ranks, and the GLPK knapsack training over 3 ranks, also with a
# failing rank (each run under a time limit, so that a hang fails instead of waiting).
mpi-example: examples mpi glpk-tools
	@if $(HAVE_MPI); then \
	  mkdir -p target/mpi && \
	  $(MPICC) $(CFLAGS_STRICT) tests/mpi/test_mpi.c -o target/mpi/test_mpi $(LINK_MPI) && \
	  timeout 300 mpirun $(MPIRUN_FLAGS) -np 3 ./target/mpi/test_mpi && \
	  $(MPICC) $(CFLAGS_STRICT) examples/c/mpi_two_phase.c -o target/examples/mpi_two_phase $(LINK_PERT) && \
	  timeout 300 mpirun $(MPIRUN_FLAGS) -np 2 ./target/examples/mpi_two_phase && \
	  $(MPICC) $(CFLAGS_STRICT) examples/c/mpi_knapsack.c -o target/mpi/mpi_knapsack $(LINK_MPI) -lglpk && \
	  timeout 300 mpirun $(MPIRUN_FLAGS) -np 3 ./target/mpi/mpi_knapsack 3 && \
	  timeout 300 mpirun $(MPIRUN_FLAGS) -np 3 ./target/mpi/mpi_knapsack --fail-on-rank 2; \
	else \
	  echo "SKIPPED mpi-example: $(MPICC)/mpirun not found"; \
	fi

# perturbations.mpi (mpi4py) over 3 ranks: its tests (tests/mpi/test_mpi_python.py) and the
# training example (examples/python/mpi_training.py), run from outside the checkout with the
# installed package and the component built here.
ifdef LIBTORCH
mpi-python:
	@echo "SKIPPED $@: LIBTORCH is set (the Python package runs in the torch venv the Makefile makes)"
else
mpi-python: python-package mpi
	@if $(HAVE_MPI); then \
	  "$(VENV)/bin/pip" install --quiet --disable-pip-version-check mpi4py && \
	  cd /tmp && export PERTURBATIONS_MPI_LIB="$(abspath $(MPI_LIB))" && \
	  timeout 300 mpirun $(MPIRUN_FLAGS) -np 3 "$(VENV)/bin/python" "$(abspath tests/mpi/test_mpi_python.py)" && \
	  timeout 300 mpirun $(MPIRUN_FLAGS) -np 3 "$(VENV)/bin/python" "$(abspath examples/python/mpi_training.py)"; \
	else \
	  echo "SKIPPED mpi-python: $(MPICC)/mpirun not found"; \
	fi
endif

# A MILP from GLPK made differentiable with per-worker models (pert_op_new_ex): checked
# against a plain solver, its throughput on 1 and 2 workers printed.
glpk-example: examples glpk-tools
	cc $(CFLAGS_STRICT) examples/c/glpk_knapsack.c -o target/examples/glpk_knapsack $(LINK_PERT) -lglpk
	./target/examples/glpk_knapsack

# Predict-then-optimize in libtorch C++: the shortest-path benchmark of decision-focused
# learning (deg 1, 4, 6; N = 1 and 10), test regret per epoch, learning curves as an SVG.
predict-then-optimize: examples
	./target/examples/predict_then_optimize target/examples/regret.svg

# Every README block is tagged `<!-- readme-test: GROUP NAME -->` (scripts/readme_blocks.py
# check fails on an untagged block or a group not run here): each group's files written
# and its commands run as printed, in a new directory outside the repository, pointed at
# this checkout (julia: tests/julia_binding.rs, statically; python and walkthrough: make
# readme-python, after the package is installed; excerpt: checked against its file, which
# make glpk-example compiles and runs; commands: make -n, as make test is the caller). The
# Rust project keeps its target folder under target/ so that later runs are quick. Groups
# that use the Makefile's venv are skipped when LIBTORCH is set.
README_GROUPS := commands c cpp cpp-torch rust solver install julia python walkthrough mpi
readme-blocks: examples mpi
	python3 scripts/readme_blocks.py check $(README_GROUPS)
	@export README_VENV="$(VENV)"; \
	python3 scripts/readme_blocks.py run c --expect '(softmax(theta/0.5) = [0.234 0.637 0.129])' && \
	python3 scripts/readme_blocks.py run cpp --expect 'd y_0 / d theta' && \
	python3 scripts/readme_blocks.py run solver --expect 'y = [' && \
	python3 scripts/readme_blocks.py run install --with c,cpp --home --expect 'd y_0 / d theta' && \
	if $(HAVE_MPI) && [ -f $(MPI_LIB) ]; then \
	  OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1 \
	    python3 scripts/readme_blocks.py run mpi --expect 'y = ['; \
	else echo "SKIPPED README group mpi: no MPI"; fi && \
	if [ -n "$(LIBTORCH)" ]; then echo "SKIPPED README groups rust, cpp-torch: LIBTORCH is set (they use the venv)"; else \
	  python3 scripts/readme_blocks.py run cpp-torch --expect 'accuracy' && \
	  CARGO_TARGET_DIR="$(abspath target/readme-rust)" python3 scripts/readme_blocks.py run rust --expect 'y sums to 1.000'; \
	fi

cargo-test: build
	$(CARGO) test --release

# The core's tests once more in the debug profile, where Rust checks the preconditions of
# its unsafe operations (a slice over a NULL pointer, say) that a release build skips.
cargo-test-debug: build
	$(CARGO) test --lib --test rust_api --test estimators --test pinned --test scale --test architecture

ctest: build mpi
	cmake -S tests/c -B $(CTEST_DIR) -DPERT_ROOT=$(abspath .) -DCMAKE_BUILD_TYPE=Release \
	  -DTORCH_DIR="$(TORCH_DIR)" -DTORCH_CXX11_ABI=$(TORCH_ABI) >/dev/null
	cmake --build $(CTEST_DIR) -j2
	cd $(CTEST_DIR) && ctest --output-on-failure

# --- examples -------------------------------------------------------------
EXAMPLES := seed_walkthrough shortest_path
examples: build
	@mkdir -p target/examples
	@for e in $(EXAMPLES); do \
	  cc $(CFLAGS_STRICT) examples/c/$$e.c -o target/examples/$$e $(LINK_PERT) || exit 1; \
	done
	c++ $(CXXFLAGS_STRICT) examples/cpp/shortest_path.cpp -Ibindings/cpp -o target/examples/shortest_path_cpp $(LINK_PERT)
	c++ $(CXXFLAGS_STRICT) $(TORCH_CXX) examples/cpp/train_torch.cpp -Ibindings/cpp -o target/examples/train_torch $(LINK_PERT) $(TORCH_LINK)
	c++ $(CXXFLAGS_STRICT) $(TORCH_CXX) examples/cpp/predict_then_optimize.cpp -Ibindings/cpp -o target/examples/predict_then_optimize $(LINK_PERT) $(TORCH_LINK)

demo: examples
	./target/examples/seed_walkthrough
	./target/examples/shortest_path target/examples
	./target/examples/shortest_path_cpp
	./target/examples/train_torch

# --- GPU check ----------------------------------------------------------------
# The files scripts/gpu-check.sh needs on a GPU machine (which has no cargo): the library,
# the C harness, the Rust test binaries that run there, the benchmark's solvers and the
# noise-rate program. Carry target/release/libperturbations.so, target/ctest,
# target/gpu-tests, target/bench and target/release/examples/noise_rate.
GPU_RUST_TESTS := perturbations estimators reliability rust_api scale pinned
gpu-files: build
	cmake -S tests/c -B $(CTEST_DIR) -DPERT_ROOT=$(abspath .) -DCMAKE_BUILD_TYPE=Release \
	  -DTORCH_DIR="$(TORCH_DIR)" -DTORCH_CXX11_ABI=$(TORCH_ABI) >/dev/null
	cmake --build $(CTEST_DIR) -j2
	@mkdir -p target/bench
	cc -std=c11 -O2 -shared -fPIC bench/bench_solvers.c -Iinclude -o target/bench/libbench_solvers.so
	$(CARGO) build --release --example noise_rate
	rm -rf target/gpu-tests && mkdir -p target/gpu-tests
	$(CARGO) test --release --no-run --message-format=json 2>/dev/null | "$(if $(LIBTORCH),python3,$(VENV)/bin/python)" -c \
	  'import json, shutil, sys; want = set(sys.argv[1:]); [shutil.copy(m["executable"], "target/gpu-tests/" + m["target"]["name"]) for m in map(json.loads, sys.stdin) if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"] and m["target"]["name"] in want]' $(GPU_RUST_TESTS)
	@ls target/gpu-tests

# --- benchmark --------------------------------------------------------------
# This library against the seed's algorithm (bench/seed_algorithm.py), side by side.
bench: build
	@mkdir -p target/bench
	cc -std=c11 -O2 -shared -fPIC bench/bench_solvers.c -Iinclude -o target/bench/libbench_solvers.so
	c++ -std=c++17 -O2 $(TORCH_CXX) bench/adapter_bench.cpp -Ibindings/cpp -o target/bench/adapter_bench $(LINK_PERT) $(TORCH_LINK)
	"$(if $(LIBTORCH),python3,$(VENV)/bin/python)" bench/bench.py --out target/bench/results.md $(BENCH_FLAGS)
	$(MAKE) --no-print-directory bench-methods
	$(MAKE) --no-print-directory bench-pool
	$(MAKE) --no-print-directory bench-mpi
	$(MAKE) --no-print-directory bench-python

# Training with an expensive solver (GLPK) and a solution pool, solve_ratio 1 / 0.3 / 0.1
# (bench/pool_knapsack.c; the README's "Expensive solvers" table).
bench-pool: build glpk-tools
	@mkdir -p target/bench
	cc $(CFLAGS_STRICT) bench/pool_knapsack.c -o target/bench/pool_knapsack $(LINK_PERT) -lglpk
	./target/bench/pool_knapsack 10 | tee target/bench/pool.md

# The MPI component's distribution efficiency: a solver sleeping 2 ms per row, np = 1, 2, 4
# and 8 (bench/mpi_scale.c; the README's "On a cluster" table).
bench-mpi: mpi
	@mkdir -p target/bench
	$(MPICC) -std=c11 -O2 bench/mpi_scale.c -o target/bench/mpi_scale $(LINK_MPI)
	sh bench/mpi_scale.sh target/bench/mpi_scale $(MPIRUN_FLAGS) | tee target/bench/mpi.md

# The decision-focused methods against the solver calls they make (bench/methods.c).
bench-methods: build
	@mkdir -p target/bench
	cc -std=c11 -O2 bench/methods.c examples/c/grid_shortest_path.c -o target/bench/methods $(LINK_PERT)
	./target/bench/methods 32 4000 | tee target/bench/methods.md
	./target/bench/methods 256 1000 | tee -a target/bench/methods.md

# --- deep checks (also run by .ci/run) -----------------------------------------
# Sanitizers (clang's ASan + UBSan, LeakSanitizer on) over the C and C++ harness, valgrind
# memcheck over the C harness, and the libFuzzer harness of the C API for FUZZ_SECONDS.
FUZZ_SECONDS ?= 60
ASAN_DIR := target/asan
SAN_FLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
export ASAN_OPTIONS := allocator_may_return_null=1:detect_leaks=1
export UBSAN_OPTIONS := halt_on_error=1:print_stacktrace=1

check-deep: sanitizers valgrind fuzz sweeps fault miri tsan
	@echo "make check-deep: sanitizers, valgrind, fuzzing, the sweeps, fault injection, Miri and ThreadSanitizer passed"

# The nightly toolchain of the deep checks (stable stays the default), pinned (the checks
# use unstable options), with Miri and the standard library's sources (-Zbuild-std).
NIGHTLY := nightly-2026-05-20
nightly:
	@rustup toolchain list | grep -q '^$(NIGHTLY)' || rustup toolchain install $(NIGHTLY) --profile minimal
	@rustup +$(NIGHTLY) component list --installed | grep -q '^miri' || rustup +$(NIGHTLY) component add miri
	@rustup +$(NIGHTLY) component list --installed | grep -q '^rust-src' || rustup +$(NIGHTLY) component add rust-src

# The long sweeps: bit equality over random shapes, op kinds and thread settings, and
# forks at random moments of other threads' calls (every child frees every op and exits;
# every child's first call on a new thread succeeds while the parent's new threads make
# their first calls).
SWEEP_CASES ?= 3000
FORK_SWEEP ?= 2000
sweeps: ctest
	$(CTEST_DIR)/sweep_bits $(SWEEP_CASES) 1
	$(CTEST_DIR)/sweep_bits $(SWEEP_CASES) 2
	PERT_FORK_SWEEP=$(FORK_SWEEP) $(CTEST_DIR)/test_trust

# Fault injection: the library built with nightly and --cfg pert_fault_injection (a failed
# allocation panics, and the C boundary returns an error, instead of aborting); every
# allocation of small calls failed in turn, threads that cannot start, a solver failing
# at every call (tests/fault/fault_inject.c).
FAULT_DIR := target/fault
fault: tools nightly $(TORCH_DEP)
	RUSTFLAGS="--cfg pert_fault_injection" $(CARGO_ENV) cargo +$(NIGHTLY) build --release --lib --target-dir $(FAULT_DIR)
	@ln -sf libperturbations.so $(FAULT_DIR)/release/libperturbations.so.$(SOVERSION)
	cc -std=c11 -O1 -g -Wall -Wextra -Werror -Iinclude tests/fault/fault_inject.c -o $(FAULT_DIR)/fault_inject \
	  -L$(FAULT_DIR)/release -lperturbations -Wl,-rpath,$(abspath $(FAULT_DIR)/release) -lm -lpthread -ldl
	$(FAULT_DIR)/fault_inject 2> target/fault-inject.log || { tail -40 target/fault-inject.log; exit 1; }

# Miri over the pure-Rust kernels (the block scheduler, the worker threads, the non-zero
# scan, the selection of the largest entries, the rows kept in unzeroed room, the solution
# pool's ring and table, the rows a call keeps for its pool, the fork gate), with their
# AVX2 paths compiled in and taken, under several scheduling seeds. (The floating-point
# state test is skipped: Miri runs no inline assembly.)
MIRI_TESTS := dot:: methods::passes kernels::nonzero kernels::largest kernels::blocks kernels::two_stages kernels::workers kernels::sums kernels::listed kernels::row_vectors estimate::solution_rows pool::tests recent fork_safe
MIRI_SEEDS ?= 0..3
miri: nightly $(TORCH_DEP)
	RUSTFLAGS="-Ctarget-feature=+avx2,+fma" MIRIFLAGS="-Zmiri-many-seeds=$(MIRI_SEEDS)" \
	  $(CARGO_ENV) cargo +$(NIGHTLY) miri test --lib --target-dir target/miri -- $(MIRI_TESTS) \
	  --skip floating_point

# ThreadSanitizer: the library, its dependencies and std built with -Zsanitizer=thread
# (nightly, -Zbuild-std), running the C stress programs (instrumented by clang and linked
# with the nightly's own TSan runtime, which matches the library's instrumentation) and
# the Rust concurrency tests. libtorch and its OpenMP runtime are not instrumented; only
# libgomp's known false positives are suppressed (tests/tsan.supp).
RUST_TARGET := x86_64-unknown-linux-gnu
TSAN_DIR := target/tsan
TSAN_LIB := $(TSAN_DIR)/$(RUST_TARGET)/release
TSAN_CARGO := RUSTFLAGS="-Zsanitizer=thread" $(CARGO_ENV) cargo +$(NIGHTLY)
TSAN_RUN := TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 suppressions=$(abspath tests/tsan.supp)"
TSAN_PROGRAMS := test_threads sweep_bits
tsan: tools nightly clang-tools $(TORCH_DEP)
	$(TSAN_CARGO) build -Zbuild-std --target $(RUST_TARGET) --release --lib --target-dir $(TSAN_DIR)
	@ln -sf libperturbations.so $(TSAN_LIB)/libperturbations.so.$(SOVERSION)
	@runtime="$$(rustc +$(NIGHTLY) --print sysroot)/lib/rustlib/$(RUST_TARGET)/lib/librustc-nightly_rt.tsan.a"; \
	for t in $(TSAN_PROGRAMS); do \
	  clang-14 -fsanitize=thread -g -O1 -std=gnu11 -c tests/c/$$t.c -o $(TSAN_DIR)/$$t.o -Iinclude && \
	  clang-14 $(TSAN_DIR)/$$t.o -o $(TSAN_DIR)/$$t -Wl,--whole-archive "$$runtime" -Wl,--no-whole-archive \
	    -L$(TSAN_LIB) -lperturbations -Wl,-rpath,$(abspath $(TSAN_LIB)) -lm -lpthread -ldl -lstdc++ -rdynamic || exit 1; \
	done
	$(TSAN_RUN) $(TSAN_DIR)/test_threads
	$(TSAN_RUN) $(TSAN_DIR)/sweep_bits 150 3
	$(TSAN_RUN) $(TSAN_CARGO) test -Zbuild-std --target $(RUST_TARGET) --release --lib --target-dir $(TSAN_DIR) \
	  -- kernels::workers kernels::blocks intraop fork_safe pool::tests

clang-tools:
	@if ! command -v clang-14 >/dev/null || ! ls /usr/lib/llvm-14/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1; then \
	  echo "installing clang-14 and its runtimes with apt-get"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq clang-14 libclang-rt-14-dev >/dev/null; \
	fi

sanitizers: build clang-tools
	CC=clang-14 CXX=clang++-14 cmake -S tests/c -B $(ASAN_DIR) -DPERT_ROOT=$(abspath .) -DCMAKE_BUILD_TYPE=Debug \
	  -DCMAKE_C_FLAGS="$(SAN_FLAGS)" -DCMAKE_CXX_FLAGS="$(SAN_FLAGS)" >/dev/null
	cmake --build $(ASAN_DIR) -j2
	cd $(ASAN_DIR) && ctest --output-on-failure -E "install_consumers|library_links|trust"
# The fork test with no allocation stacks: clang-14's ASan does not lock its stack depot
# around fork(), so a child forked while another thread records an allocation's stack can
# wait forever on that lock (seen: a child spinning in StackDepot's lock inside free()).
	cd $(ASAN_DIR) && ASAN_OPTIONS="$$ASAN_OPTIONS:malloc_context_size=0" ctest --output-on-failure -R "^trust$$"

VALGRIND_TESTS := test_api test_scale test_estimators
valgrind: ctest
	@command -v valgrind >/dev/null || (SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq valgrind >/dev/null)
	@for t in $(VALGRIND_TESTS); do \
	  echo "valgrind memcheck: $$t"; \
	  valgrind -q --error-exitcode=9 --leak-check=full --errors-for-leak-kinds=definite --show-leak-kinds=definite \
	    --suppressions=tests/valgrind.supp $(CTEST_DIR)/$$t > target/valgrind-$$t.log 2>&1 \
	    || { cat target/valgrind-$$t.log; exit 1; }; \
	  tail -1 target/valgrind-$$t.log; \
	done

# The library's own code is instrumented for the fuzzer (sanitizer coverage on the Rust
# crate, built apart in $(FUZZ_LIB_DIR)), so that libFuzzer sees its edges, not only the
# harness's. The corpus kept in tests/fuzz/corpus is read first; new inputs go to
# target/fuzz-corpus. The report gives the library edges the corpus covers: the total
# coverage less the harness's own (the same corpus against the uninstrumented library).
FUZZ_LIB_DIR := target/fuzz-lib
SANCOV := -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=3 \
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
  -Cllvm-args=-sanitizer-coverage-trace-compares
FUZZ_ENV := ASAN_OPTIONS=allocator_may_return_null=1:detect_leaks=0
fuzz: build clang-tools
	$(CARGO) rustc --release --lib --target-dir $(FUZZ_LIB_DIR) -- $(SANCOV)
	@ln -sf libperturbations.so $(FUZZ_LIB_DIR)/release/libperturbations.so.$(SOVERSION)
	clang-14 -g -O1 -fsanitize=fuzzer,address,undefined tests/fuzz/fuzz_api.c -o target/fuzz_api -Iinclude \
	  -L$(FUZZ_LIB_DIR)/release -lperturbations -Wl,-rpath,$(abspath $(FUZZ_LIB_DIR)/release) -Wl,--export-dynamic -lm
	clang-14 -g -O1 -fsanitize=fuzzer,address,undefined tests/fuzz/fuzz_api.c -o target/fuzz_api_harness_only $(LINK_PERT)
	rm -rf target/fuzz-corpus && mkdir -p target/fuzz-corpus
	set -o pipefail; $(FUZZ_ENV) ./target/fuzz_api -max_total_time=$(FUZZ_SECONDS) \
	  -timeout=30 -rss_limit_mb=6000 -print_final_stats=1 target/fuzz-corpus tests/fuzz/corpus 2>&1 | tail -12
	@cov() { $(FUZZ_ENV) "$$@" 2>&1 | sed -n 's/.*INITED cov: \([0-9]*\).*/\1/p'; }; \
	total=$$(cov ./target/fuzz_api -runs=0 target/fuzz-corpus tests/fuzz/corpus); \
	harness=$$(cov ./target/fuzz_api_harness_only -runs=0 target/fuzz-corpus tests/fuzz/corpus); \
	counters=$$($(FUZZ_ENV) ./target/fuzz_api -runs=0 tests/fuzz/corpus 2>&1 | grep -m1 'inline 8-bit counters' \
	  | sed 's/.*counters)://' | grep -o '[0-9]* \[' | tr -d ' [' | sort -n | tail -1); \
	test -n "$$total" && test -n "$$harness" && test -n "$$counters" || { echo "fuzz: no coverage report"; exit 1; }; \
	test $$((total - harness)) -gt 0 || { echo "fuzz: the library's edges are not seen"; exit 1; }; \
	echo "fuzz: the corpus covers $$((total - harness)) edges of the library's $$counters instrumented ones (the harness alone: $$harness)"

# --- install ----------------------------------------------------------------
PREFIX ?= /usr/local
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
install: build
	@$(MAKE) --no-print-directory mpi-lib
	@$(MAKE) --no-print-directory install-files

# Installs what `make build` left (used by the install test without rebuilding).
# TORCH_LIB=/path/to/libtorch/lib sets where the installed library looks for libtorch
# (default: the libtorch it was built against; TORCH_LIB=none: the system's library path).
install-files:
	@if [ -n "$(TORCH_LIB)" ] && ! command -v patchelf >/dev/null; then \
	  echo "installing patchelf with apt-get"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq patchelf >/dev/null; \
	fi
	TORCH_LIB="$(TORCH_LIB)" sh packaging/install.sh "$(PREFIX)" "$(abspath .)" "$(VERSION)"

clean:
	cargo clean
