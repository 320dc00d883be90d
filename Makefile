# torchsphere: two commands do all the set-up on a fresh machine.
#   make test   create .venv when absent, install torch (CPU) + the package, run the test suite
#   make demo   the same set-up, then train and compare CNN vs SphereNets on Fashion-MNIST
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: venv test demo bench clean data results

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is installed first and pinned: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# Fashion-MNIST from Debian when apt-get is available and the files are missing (the demo falls back to digits).
data:
	@bash scripts/get_fashion_mnist.sh || true

demo: $(STAMP) data
	$(PY) -m torchsphere compare --preset demo --output reports/demo

# the experiments of experiments/README.md (Fashion-MNIST, many CPU hours) and docs/results.md; resumable, see experiments/README.md
results: $(STAMP) data
	$(PY) experiments/run_all.py --jobs 2

bench: $(STAMP)
	$(PY) benchmarks/bench_ops.py

clean:
	rm -rf $(VENV) .pytest_cache build dist
