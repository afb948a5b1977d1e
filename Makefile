# Two commands for a user: `make demo` and `make test`. Each creates .venv on first use,
# installs the pinned torch (TORCH=... overrides it, TORCH_ARGS=... passes pip options
# such as an --index-url of CPU wheels), installs the rest, builds the C++ extension
# against that torch (--no-build-isolation, so no second torch is pulled) and runs.
PYTHON ?= python3
TORCH ?= torch==2.13.0
TORCH_ARGS ?=
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.localprop-installed
SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh) setup.py pyproject.toml

.PHONY: demo test bench build clean asan gpu-check

demo: $(STAMP)
	$(VENV)/bin/localprop demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m pytest bench -q --benchmark-only

build: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first and alone, pinned, so that nothing later resolves it to a CUDA build
$(STAMP): $(PY) $(SOURCES)
	$(PIP) install -q "$(TORCH)" $(TORCH_ARGS)
	$(PIP) install -q "setuptools>=77" wheel numpy tqdm scikit-learn matplotlib pytest pytest-benchmark hypothesis triton==3.9.0 mnist1d transformers==5.24.0
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

# The C++ ops under AddressSanitizer. The sanitized extension is built outside the source
# tree (the in-place one stays as it is) into ASAN_DIR, beside a copy of the Python
# package and tests, and the CPU op tests run from there, so `localprop._C` can only
# resolve to the sanitized library. python itself is not instrumented, so libasan is
# preloaded, and libstdc++ with it: loaded later (by torch), its __cxa_throw is missed by
# ASan's interceptor, which then aborts on the first C++ exception (any TORCH_CHECK).
# Leak checks are off: the interpreter keeps its allocations until exit by design.
# --capture=sys: with pytest's default fd capture, the report of a process that ASan
# kills is swallowed.
ASAN_DIR := build/asan
ASAN_ENV := LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	ASAN_OPTIONS=detect_leaks=0 PYTHONPATH=.

asan: $(STAMP)
	rm -rf $(ASAN_DIR)/localprop $(ASAN_DIR)/tests
	mkdir -p $(ASAN_DIR)
	cp -r localprop tests $(ASAN_DIR)/
	rm -f $(ASAN_DIR)/localprop/_C*.so
	CFLAGS="-fsanitize=address -fno-omit-frame-pointer" LDFLAGS="-fsanitize=address" \
		$(PY) setup.py -q build_ext --build-lib $(ASAN_DIR) --build-temp $(ASAN_DIR)/tmp
	cd $(ASAN_DIR) && $(ASAN_ENV) $(abspath $(PY)) -c \
		"import localprop._C as c; print('sanitized extension:', c.__file__); assert '$(ASAN_DIR)' in c.__file__"
	cd $(ASAN_DIR) && $(ASAN_ENV) $(abspath $(PY)) -m pytest -q -p no:cacheprovider --capture=sys \
		tests/ops -m "not gpu" --ignore=tests/ops/test_cuda_compile.py

# On a GPU machine, with that machine's own python (a CUDA torch, triton, nvcc; no network
# and no venv): build the CUDA ops in place, run the GPU tests and the GPU suite. Results
# under $OUT, else out/gpu. GPU_CHECK_ARGS passes options (--quick, --skip-build, --sizes).
gpu-check:
	PYTHONUNBUFFERED=1 $(PYTHON) bench/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf build $(VENV) *.egg-info localprop/_C*.so
