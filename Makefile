# The two commands (README): `make run` and `make test`. Both set the host up
# first; scripts/setup-host.sh is idempotent and quick when nothing changed.
# `make run` installs what the guard needs and nothing else; `make test` adds
# the test bed (sshd, Slurm, Prometheus, docker.io, debootstrap, ...).
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup setup-test run scan test lint unit bench install clean

setup:
	bash scripts/setup-host.sh

setup-test:
	bash scripts/setup-host.sh --test

# The daemon in the foreground on the built-in defaults (monitor mode,
# eBPF sensor with polling fallback); Ctrl-C stops it and detaches everything.
run: setup
	$(VENV)/bin/rome-guard run

scan: setup
	$(VENV)/bin/rome-guard scan

# vermin: rome_guard must run on Python 3.9 (RHEL 9's python3, the oldest
# Python a distribution builds BCC for); ruff's target-version says the same.
lint: setup-test
	$(VENV)/bin/ruff check rome_guard tests bench
	$(VENV)/bin/ruff format --check rome_guard tests bench
	$(VENV)/bin/vermin -t=3.9- --no-tips --violations rome_guard
	$(VENV)/bin/vulture

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup-test
	$(PY) -m bench

# `make install` (as root): rome-guard in its own venv (PREFIX), the command
# BINDIR/rome-guard, CONFDIR/config.yaml (only if absent: local edits are
# kept), CONFDIR/rules.d/ for site rules, and the systemd unit. BCC comes from
# the system Python's own package (python3-bpfcc, RHEL: python3-bcc), linked
# into the venv, nothing else of the system's site-packages; without it the
# install stops and names the package. The Slurm prolog/epilog in LIBEXECDIR
# (docs/gpu.md). docs/install.md; every path can be overridden.
PREFIX ?= /opt/rome-guard
BINDIR ?= /usr/local/bin
CONFDIR ?= /etc/rome-guard
UNITDIR ?= /etc/systemd/system
LIBEXECDIR ?= /usr/local/libexec/rome-guard
SYSTEM_PYTHON ?= /usr/bin/python3
PIP_INSTALL_ARGS ?=

install:
	@test -x $(SYSTEM_PYTHON) || { echo "install: no $(SYSTEM_PYTHON); set SYSTEM_PYTHON=" >&2; exit 2; }
	@$(SYSTEM_PYTHON) -c 'import bcc' 2>/dev/null || { echo "install: $(SYSTEM_PYTHON) has no BCC:" \
		"install $$(bash scripts/setup-host.sh --bcc-package 2>/dev/null || echo 'BCC for it')" \
		"(or set SYSTEM_PYTHON= to the Python your distribution built BCC for)" >&2; exit 2; }
	test -x $(PREFIX)/bin/python || $(SYSTEM_PYTHON) -m venv $(PREFIX)
	$(PREFIX)/bin/python -m pip install -q --disable-pip-version-check $(PIP_INSTALL_ARGS) .
	@bcc=$$($(SYSTEM_PYTHON) -c 'import bcc, os; print(os.path.dirname(bcc.__file__))'); \
	site=$$($(PREFIX)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	mkdir -p $(PREFIX)/system-bcc && ln -sfn "$$bcc" $(PREFIX)/system-bcc/bcc && \
	echo $(PREFIX)/system-bcc > "$$site/system-bcc.pth"
	$(PREFIX)/bin/python -c 'import bcc' || { echo "install: BCC does not import in $(PREFIX)" >&2; exit 2; }
	install -d -m 0755 $(BINDIR) $(CONFDIR) $(CONFDIR)/rules.d $(UNITDIR) $(LIBEXECDIR)
	ln -sfn $(PREFIX)/bin/rome-guard $(BINDIR)/rome-guard
	for s in slurm-prolog.sh slurm-epilog.sh oci-gpu-hook.sh; do \
		sed -e 's|ROME_GUARD:-rome-guard|ROME_GUARD:-$(BINDIR)/rome-guard|' scripts/$$s > $(LIBEXECDIR)/.$$s.tmp && \
		chmod 0755 $(LIBEXECDIR)/.$$s.tmp && mv $(LIBEXECDIR)/.$$s.tmp $(LIBEXECDIR)/$$s; done
	test -e $(CONFDIR)/config.yaml || install -m 0644 systemd/config.yaml $(CONFDIR)/config.yaml
	sed -e 's|/usr/local/bin/rome-guard|$(BINDIR)/rome-guard|g' -e 's|/etc/rome-guard/|$(CONFDIR)/|g' \
		systemd/rome-guard.service > $(UNITDIR)/.rome-guard.service.tmp
	chmod 0644 $(UNITDIR)/.rome-guard.service.tmp
	mv $(UNITDIR)/.rome-guard.service.tmp $(UNITDIR)/rome-guard.service
	@if [ -d /run/systemd/system ] && [ "$(UNITDIR)" = /etc/systemd/system ]; then \
		systemctl daemon-reload; fi
	@echo "installed rome-guard $$($(BINDIR)/rome-guard --version 2>/dev/null | awk '{print $$NF}');" \
		"start it with: systemctl enable --now rome-guard"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache tests/fixtures/build
