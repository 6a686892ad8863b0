# Two commands do all set-up on a fresh machine:
#   make demo   create .venv, install, run the whole pipeline on the bundled digits
#   make test   create .venv, install, then the named steps CI runs, in order:
#                 lint        ruff (rules chosen in pyproject.toml)
#                 test-fast   the default pytest run: the developer loop (slow, chaos, bench excluded)
#                 test-slow   whole DAG runs (disk and S3 pipeline roots), multi-process jobs
#                 test-chaos  fault injection (tests/chaos/): killed ranks, broken writes, S3 faults
#                 test-study  the proof study end to end at its tiny size (bench/, needs the bench extra)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint test-fast test-slow test-chaos test-study system-deps clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CUDA build of torch runs on CPU too; pinned so pip never pulls another multi-GB wheel.
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $@

# Real Prometheus, Pushgateway and promtool for the observability tests (Debian packages).
system-deps:
	@command -v prometheus >/dev/null && command -v prometheus-pushgateway >/dev/null && command -v promtool >/dev/null \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus prometheus-pushgateway >/dev/null; }

demo: $(BIN)/.installed
	$(BIN)/erw pipeline run-local --config configs/demo.yaml

test: lint test-fast test-slow test-chaos test-study

lint: $(BIN)/.installed
	$(BIN)/ruff check .

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
