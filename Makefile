# make test: set up .venv (first time only) and run the tests.
# make demo: set up .venv, fetch the default corpus, train the default small model and print a sample.
#
# torch is installed first, pinned, so the same command works everywhere:
#   - with an NVIDIA GPU, PyPI's Linux wheel of torch is the CUDA build: nothing to set;
#   - on a CPU-only machine the same wheel works but is large; for the small CPU-only build, run
#       make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
#   - any other torch >= 2.3 also works: make test TORCH=torch==2.5.1
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python

.PHONY: setup test demo lint format clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

# The demo's run folder is replaced on every `make demo`; train into another --out to keep a run.
demo: setup
	rm -rf out/demo
	$(PY) train.py --out out/demo
