# The two commands (README): `make run` and `make test`. Both set the host up
# first; scripts/setup-host.sh is idempotent and quick when nothing changed.
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup run scan test lint unit bench install clean

setup:
	bash scripts/setup-host.sh

# The daemon in the foreground on the built-in defaults (monitor mode,
# eBPF sensor with polling fallback); Ctrl-C stops it and detaches everything.
run: setup
	$(VENV)/bin/rome-guard run

scan: setup
	$(VENV)/bin/rome-guard scan

lint: setup
	$(VENV)/bin/ruff check rome_guard tests bench
	$(VENV)/bin/ruff format --check rome_guard tests bench

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache tests/fixtures/build
