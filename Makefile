# make test: set up .venv (first time only) and run the tests.
# make demo: set up .venv, fetch the default corpus, train the default small model and print a sample.
#
# torch is installed first, pinned, so the same command works everywhere:
#   - with an NVIDIA GPU, PyPI's Linux wheel of torch is the CUDA build: nothing to set;
#   - on a CPU-only machine the same wheel works but is large; for the small CPU-only build, run
#       make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
#   - any other torch >= 2.4 also works: make test TORCH=torch==2.5.1
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python

.PHONY: setup test demo lint format clean figures

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# The second pass reruns the floating-point comparisons with one thread and unvectorised kernels: another
# summation order than the first, so no tolerance passes only on this machine's CPU (tests/conftest.py).
test: setup
	$(PY) -m pytest -q
	ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider -m "numerics and not slow"

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

# make figures: regenerate every image in docs/img (docs/STUDY.md shows them). The activation and GLU plots
# need nothing; the training curves and FFN statistics read a run: out/demo when `make demo` has made one,
# otherwise out/figures, trained here first if it has no best/ checkpoint (200 steps, a few minutes on a
# 2-core CPU). FIGURES_RUN=runs/mine plots another finished run.
FIGURES_RUN ?= $(if $(wildcard out/demo/best/config.json),out/demo,out/figures)

figures: setup
	$(PY) -m llama_mini.plots activations --out docs/img
	$(PY) -m llama_mini.plots glu --out docs/img
	if [ "$(FIGURES_RUN)" = out/figures ] && [ ! -f out/figures/best/config.json ]; then \
		rm -rf out/figures && \
		$(PY) train.py --out out/figures --max-steps 200 --eval-interval 50 --sample-tokens 0; \
	fi
	$(PY) -m llama_mini.plots training --runs $(FIGURES_RUN) --out docs/img
	$(PY) -m llama_mini.plots ffn-stats --checkpoint $(FIGURES_RUN)/best --compare-init --out docs/img
