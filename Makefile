# Two commands do all set-up on a fresh machine:
#   make demo   create .venv, install, run the whole pipeline on the bundled digits
#   make test   create .venv, install, then the named steps CI runs, in order:
#                 lint        ruff check (rules chosen in pyproject.toml) and ruff format --check
#                 test-fast   the default pytest run: the developer loop (slow, chaos, bench excluded)
#                 test-slow   whole DAG runs (disk and S3 pipeline roots), multi-process jobs
#                 test-chaos  fault injection (tests/chaos/): killed ranks, broken writes, S3 faults
#                 test-study  the proof study end to end at its tiny size (bench/, needs the bench extra)
#                 test-image  builds the image (make image), then runs it: the demo DAG with every step a
#                             container, the training job's pods as containers (tests/image/)
PYTHON ?= python3
IMAGE ?= localhost/erw:dev
BASE_IMAGE ?=
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo lock test lint test-fast test-slow test-chaos test-study test-image image image-deps system-deps clean

# The venv holds exactly locks/dev.txt (hash-checked; --no-deps because the lock is the whole
# closure), the versions the image ships plus the dev tools; erw itself is installed editable with
# the locked setuptools. Nothing is resolved here, so a new release on PyPI changes nothing.
$(BIN)/.installed: locks/dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-deps --require-hashes -r locks/dev.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	touch $@

# Regenerate locks/runtime.txt and locks/dev.txt after changing pyproject.toml (uv, pinned in the dev
# extra). Current pins are kept where allowed; `make lock UPGRADE=1` moves all to the newest.
lock: $(BIN)/.installed
	$(BIN)/python locks/lock.py $(if $(UPGRADE),--upgrade)

# Real Prometheus, Pushgateway and promtool for the observability tests (Debian packages).
system-deps:
	@command -v prometheus >/dev/null && command -v prometheus-pushgateway >/dev/null && command -v promtool >/dev/null \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus prometheus-pushgateway >/dev/null; }

demo: $(BIN)/.installed
	$(BIN)/erw pipeline run-local --config configs/demo.yaml

test: lint test-fast test-slow test-chaos test-study test-image

# The production image (container/build.sh: Docker when a daemon answers, else podman; a local
# Debian base when no registry is reachable). Prints its tag, size and build time.
image: image-deps
	IMAGE=$(IMAGE) BASE_IMAGE=$(BASE_IMAGE) bash container/build.sh

# podman and debootstrap from Debian's packages, unless a Docker daemon answers.
image-deps:
	@{ command -v docker >/dev/null && docker info >/dev/null 2>&1; } \
	  || { command -v podman >/dev/null && command -v buildah >/dev/null && command -v debootstrap >/dev/null; } \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah runc debootstrap >/dev/null; }

test-image: $(BIN)/.installed system-deps image
	ERW_TEST_IMAGE=$(IMAGE) $(BIN)/pytest -m image -s

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test-fast: $(BIN)/.installed system-deps
	$(BIN)/pytest

test-slow: $(BIN)/.installed system-deps
	$(BIN)/pytest -m slow

test-chaos: $(BIN)/.installed system-deps
	$(BIN)/pytest -m chaos

test-study: $(BIN)/.installed
	$(BIN)/pytest -m bench

clean:
	rm -rf $(VENV) runs .pytest_cache
