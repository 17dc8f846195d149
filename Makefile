# memfit — the README names these targets.
PYTHON ?= python3.11
VENV ?= .venv
# torch is pinned here, not in pyproject, so that no multi-GB CUDA wheel is pulled by accident.
# Point it at another build, e.g.  make install TORCH=torch==2.13.0 TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cu124
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: install run test lint format typecheck bench bench-quick system-deps clean model lock

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (Python >= 3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml requirements.lock Makefile
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_INDEX) "$(TORCH)"
	# dev brings the bench and pretrain extras; requirements.lock pins all of it (make lock): the suite runs on pyproject's floors
	$(PIP) install -q -e ".[dev]" -c requirements.lock
	touch $(STAMP)

install: $(STAMP)

# Debian packages the tests use: a private redis-server is started by the fixtures; headless chromium
# renders the /dashboard page (tests/service/test_dashboard.py).
system-deps:
	@if ! command -v redis-server >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = "0" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; \
	  else echo "redis-server missing: install the Debian package redis-server"; exit 1; fi; fi
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = "0" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
	  else echo "chromium missing: install the Debian package chromium"; exit 1; fi; fi

model: install
	$(VENV)/bin/memfit pretrain --preset default

run: install
	$(VENV)/bin/memfit serve --host $(HOST) --port $(PORT)

test: install system-deps
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

typecheck: install
	$(VENV)/bin/mypy

bench: install
	$(VENV)/bin/memfit bench continual
	$(VENV)/bin/memfit bench swap

bench-quick: install
	$(VENV)/bin/memfit bench continual --quick

# rewrite requirements.lock from this virtualenv after changing pyproject's dependencies (tools/lock.py)
lock: install
	$(PY) tools/lock.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
