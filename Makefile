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

.PHONY: demo test bench build clean

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
	$(PIP) install -q "setuptools>=69" wheel numpy tqdm scikit-learn matplotlib pytest pytest-benchmark hypothesis triton==3.9.0 mnist1d
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

clean:
	rm -rf build $(VENV) *.egg-info localprop/_C*.so
