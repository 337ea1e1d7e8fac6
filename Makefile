# The two commands a new user runs:  `make demo`  and  `make test`.
# Each creates (or updates, when pyproject.toml changed) the virtual environment in .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medclipin-installed
# Runs must not depend on a model hub or on albumentations' update check.
export HF_HUB_OFFLINE ?= 1
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: venv demo test test-fast bench-gpu clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/medclipin demo --out demo_out

# On a lent CUDA machine: bf16 / fused AdamW / collectives checked against CPU, then ViT-B/16 + BERT-base
# samples/s and MFU (a few minutes). `medclipin bench gpu --dry-run` runs the same on CPU at a tiny size.
bench-gpu: $(STAMP)
	$(VENV)/bin/medclipin bench gpu --json bench_gpu.json

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) demo_out bench_gpu.json .pytest_cache
