# Two commands a newcomer needs: `make serve` and `make test`. Both install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default (these machines have it locally). GPU users: `make setup TORCH_SPEC=torch==2.13.0
# TORCH_INDEX=--index-url=<your CUDA wheel index>`, or install torch into .venv yourself first.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.fleetserve-installed
# A second environment with NVIDIA GR00T N1.6's pins at its last N1.6 release (its pyproject.toml; torch stays the
# local build): users install fleetserve into their GR00T environment, so `make test` checks N1.6 there.
GR00T_VENV ?= .venv-gr00t
GR00T_PY := $(GR00T_VENV)/bin/python
GR00T_STAMP := $(GR00T_VENV)/.fleetserve-installed
GR00T_PINS := transformers==4.51.3 numpy==1.26.4 msgpack==1.1.0 pyzmq==27.0.1
# Policy, gr00t backend and serving under those pins: a focused subset (one Serve app), not the whole suite.
GR00T_TESTS := tests/unit/test_processing_gr00t_n1d6.py tests/unit/test_state_action.py tests/unit/test_checkpoint.py \
	tests/unit/test_gr00t_backend.py tests/integration/test_modeling_gr00t_n1d6.py \
	tests/integration/test_gr00t_n16_parity.py tests/integration/test_policy.py tests/integration/test_inference_path.py \
	tests/integration/test_serving.py::test_every_endpoint_through_policy_client \
	tests/integration/test_serving.py::test_info_names_the_device_each_replica_got_and_its_warm_up

.PHONY: setup setup-gr00t serve test test-unit test-integration test-system test-gr00t bench gpu-check checkpoints clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch first, so the bare `torch` requirement below is already satisfied and pulls no CUDA wheels.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[test,bench]"
	touch $(STAMP)

# Ray starts its workers at niceness 15, below its own daemons and anything else on the node; the replicas are
# this node's workload, so they run at 0 (on a busy 2-core machine the forward pass ran ~1.5 ms slower at 15).
serve: setup
	RAY_SERVE_ENABLE_TASK_EVENTS=0 RAY_worker_niceness=0 $(VENV)/bin/serve run serve_config.yaml

setup-gr00t: $(GR00T_STAMP)

$(GR00T_STAMP): pyproject.toml
	test -x $(GR00T_PY) || $(PYTHON) -m venv $(GR00T_VENV)
	$(GR00T_PY) -c "import torch" 2>/dev/null || $(GR00T_PY) -m pip install $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(GR00T_PY) -m pip install $(GR00T_PINS) -e ".[test]"
	touch $(GR00T_STAMP)

test: setup setup-gr00t
	$(PY) -m pytest -q
	$(MAKE) --no-print-directory test-gr00t

# The layers alone (README, "Tests"): unit in well under a minute and starting no Ray (given as a folder, so no
# module of the other layers is even imported); integration and system share the session Ray of tests/conftest.py.
test-unit: setup
	$(PY) -m pytest -q tests/unit

test-integration: setup
	$(PY) -m pytest -q tests/integration

test-system: setup
	$(PY) -m pytest -q tests/system

test-gr00t: setup-gr00t
	$(GR00T_PY) -m pytest -q -p no:cacheprovider $(GR00T_TESTS)

# On a GPU machine with PyTorch: only torch, transformers, safetensors, tokenizers and numpy are needed.
gpu-check:
	$(PYTHON) -m bench.gpu_check $(GPU_CHECK_ARGS)

bench: setup
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) $(GR00T_VENV) checkpoints
