# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv/ from Pipfile.lock (pipenv, bootstrapped into .tools/) when missing or stale.
SHELL := /bin/bash
PYTHON ?= python3
PIPENV_VERSION := 2026.10.3
export PIPENV_VENV_IN_PROJECT := 1
export PIPENV_VERBOSITY := -1
# The Pipfile's source is ${PIP_INDEX_URL}; fill it from pip's own default when unset.
PIP_INDEX_URL ?= $(shell $(PYTHON) -c 'from pip._internal.models.index import PyPI; print(PyPI.simple_url)')
export PIP_INDEX_URL

VENV := .venv
PY := $(VENV)/bin/python
PIPENV := .tools/bin/pipenv
DEMO := demo
DEMO_TAG ?= dataset_v02
# make test's pytest-xdist workers: two keep both cores busy (one worker left one idle most of the time).
TEST_WORKERS ?= 2

.PHONY: demo test container-test lint install clean demo-data bench
install: $(VENV)/.synced

$(PIPENV):
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet pipenv==$(PIPENV_VERSION)

$(VENV)/.synced: Pipfile.lock | $(PIPENV)
	$(PIPENV) sync --dev
	touch $@

# Two dataset versions whose manifests differ (more images in v02), a DVC registry tagging both.
$(DEMO)/registry/.tagged: | $(VENV)/.synced
	$(PY) -m tools.demo_data --out $(DEMO)/isic --images 640 --seed 0
	$(PY) -m tools.prepare --input $(DEMO)/isic --out $(DEMO)/data_v01 --image-size 64 --shard-size 100 --seed 0 --limit 400
	$(PY) -m tools.prepare --input $(DEMO)/isic --out $(DEMO)/data_v02 --image-size 64 --shard-size 100 --seed 0
	$(PY) -m tools.registry --registry $(DEMO)/registry --manifest $(DEMO)/data_v01/versioned_paths.pickle --tag dataset_v01 --remote $(DEMO)/dvc-remote
	$(PY) -m tools.registry --registry $(DEMO)/registry --manifest $(DEMO)/data_v02/versioned_paths.pickle --tag dataset_v02 --remote $(DEMO)/dvc-remote
	touch $@

demo-data: $(DEMO)/registry/.tagged

demo: $(DEMO)/registry/.tagged
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" DVC_REPO="$(CURDIR)/$(DEMO)/registry" sh dvc_pull.sh -t $(DEMO_TAG)
	WANDB_MODE=offline WANDB_DIR="$(CURDIR)/$(DEMO)" $(PY) cli.py --manifest Versioning/versioned_paths.pickle \
		--data-tag $(DEMO_TAG) --output $(DEMO)/outputs --model-name demo_model --weights none \
		--image-size 64 -b 32 -e 10 -l 1e-3 -f 64 -x --calibrate --tta 8

# make test includes tests/container: as root it installs and starts a Docker engine of its own
# (state in .cache/docker) and builds the image once; without an engine those tests skip (CI: fail).
test: $(VENV)/.synced
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup

container-test: $(VENV)/.synced
	$(PY) -m pytest tests/container

lint: $(VENV)/.synced
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(VENV)/.synced
	$(PY) -m bench.all

clean:
	rm -rf $(DEMO) example Versioning .pytest_cache
