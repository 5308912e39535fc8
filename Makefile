# Two commands set up a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing and installs the pinned set (constraints.txt) into it.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=
DEMO_OUT ?= out/demo

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: install test demo bench clean

$(STAMP): setup.py constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest tests $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/specialize demo --out $(DEMO_OUT)

bench: $(STAMP)
	$(PY) -m specialize.benchmarks.run

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# One GPU acceptance run (benchmarks/gpu_check.py, <= 10 minutes): on the GPU machine, with the wheels
# that benchmarks/gpu_wheels.sh put in .whl/ on a machine with the package index. It uses that machine's
# python3 (its torch/Triton), never this project's venv or pins.
GPU_PY ?= python3
GPU_CHECK_OUT ?= benchmarks/results/gpu_check.json
.PHONY: gpu-wheels gpu-check
gpu-wheels:
	bash benchmarks/gpu_wheels.sh .whl

gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py --install .whl --out $(GPU_CHECK_OUT)
