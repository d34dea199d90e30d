# One-command setup, demo and tests. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)

.PHONY: venv venv-gpu demo test lint format benchmark gpu-check clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

# CUDA build of the pinned torch and the torchvision built against it, then the rest (pip keeps the CUDA build
# because it satisfies the pin). CUDA picks the wheel index, e.g. `make venv-gpu CUDA=cu126`.
CUDA ?= cu128
TORCH_INDEX := https://download.pytorch.org/whl/$(CUDA)

venv-gpu:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0 torchvision==0.28.0 --index-url $(TORCH_INDEX)
	$(PY) -m pip install -r requirements-dev.txt
	$(PY) -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; print(torch.cuda.get_device_name())"
	touch $(VENV)/.installed

gpu-check: venv
	$(PY) -m scripts.gpu_check --output docs/gpu_check.md

demo: venv
	$(PY) -m scripts.demo

test: venv
	$(PY) -m pytest -q -n 2 --dist loadfile tests

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

benchmark: venv
	$(PY) -m scripts.benchmark

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
