# Every target installs what it needs: a fresh clone runs `make demo` or `make test` directly.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test run lint bench clean system-deps

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# Debian packages the demo/tests use: a redis-server to start privately (never the one on 6379),
# Postfix's smtp-sink/smtpd for speed and protocol checks, promtool for the alert rules.
system-deps:
	@bash deploy/system-deps.sh

demo: $(STAMP) system-deps
	$(BIN)/notifier demo

# Two processes, whole files each (module-scoped servers start once): most tests wait on real
# servers, so two run side by side on two cores in about half the time.
test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

run: $(STAMP)
	$(BIN)/notifier run

lint: $(STAMP)
	$(BIN)/ruff check worker producer tests
	$(BIN)/ruff format --check worker producer tests
	$(BIN)/mypy

bench: $(STAMP) system-deps
	$(BIN)/notifier bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
