# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PRESET ?= tiny
# A trained bundle for bench/serving.py, e.g. the train-op/model folder of `make run`.
MODEL ?= $(lastword $(sort $(wildcard outputs/kfp/*/train-op/model)))
BIN := $(VENV)/bin
# Where torch comes from. Empty: pip's configured sources (a local CPU wheel here).
# Elsewhere, to avoid the CUDA build: TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

.PHONY: install run test test-all lint bench compile data clean

# torch first and pinned: a looser requirement lets pip pull the CUDA wheels.
$(VENV)/.installed: pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -c .ci/constraints.txt -e ".[dev]"
	$(BIN)/python -m pip check
	touch $@

# Serving on this machine: the tritonserver bundled in the nvidia-pytriton wheel (Python
# backend, CPU), unpacked beside the venv rather than installed (the wheel pins numpy < 2),
# and the small environment its Python models run in (deploy/serve-requirements.txt).
TRITON_WHEEL := nvidia-pytriton==0.7.0
$(VENV)/.serving: $(VENV)/.installed deploy/serve-requirements.txt
	rm -rf $(VENV)/serve-env $(VENV)/tritonserver $(VENV)/wheels
	$(PYTHON) -m venv $(VENV)/serve-env
	$(VENV)/serve-env/bin/python -m pip install --quiet -r deploy/serve-requirements.txt
	$(BIN)/python -m pip download --quiet --no-deps -d $(VENV)/wheels $(TRITON_WHEEL)
	$(BIN)/python -m zipfile -e $(VENV)/wheels/nvidia_pytriton-*.whl $(VENV)/tritonserver
	chmod +x $(VENV)/tritonserver/pytriton/tritonserver/bin/* \
		$(VENV)/tritonserver/pytriton/tritonserver/python_backend_stubs/*/triton_python_backend_stub
	rm -rf $(VENV)/wheels
	touch $@

install: $(VENV)/.installed $(VENV)/.serving

run: install  ## the whole pipeline on this machine (kfp.local), tiny preset
	$(BIN)/parti run --preset $(PRESET)

test: install  ## the default test suite (what CI runs)
	$(BIN)/python -m pytest

test-all: install  ## also the slow tests
	$(BIN)/python -m pytest -m "slow or not slow"

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: install
	$(BIN)/python bench/data.py
	$(BIN)/python bench/tokenizer.py
	$(BIN)/python bench/sampling.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/tracking.py
	$(BIN)/python bench/pipeline.py --overhead
	$(BIN)/python bench/pipeline.py
	$(if $(MODEL),,$(error bench/serving.py needs a trained bundle: run `make run` first or set MODEL=))
	$(BIN)/python bench/serving.py --model $(MODEL)

compile: install  ## refresh the committed pipeline YAML
	$(BIN)/parti pipeline compile --out pipelines/parti_pipeline.yaml

data: install  ## regenerate the DVC-tracked synthetic set (reproduces data.dvc)
	$(BIN)/parti data synth --out data
	$(BIN)/dvc status data.dvc

clean:
	rm -rf outputs
