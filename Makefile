# Two commands a newcomer needs: `make serve` and `make test`. Both install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default (these machines have it locally). GPU users: `make setup TORCH_SPEC=torch==2.13.0
# TORCH_INDEX=--index-url=<your CUDA wheel index>`, or install torch into .venv yourself first.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.fleetserve-installed

.PHONY: setup serve test bench checkpoints clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch first, so the bare `torch` requirement below is already satisfied and pulls no CUDA wheels.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[test,bench]"
	touch $(STAMP)

serve: setup
	RAY_SERVE_ENABLE_TASK_EVENTS=0 $(VENV)/bin/serve run serve_config.yaml

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) checkpoints
