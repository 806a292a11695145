# Qubes network server. `make demo` runs the main job, `make test` the tests.
# Both install what they need (Debian packages via apt-get, PyPI into .venv).

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: all deps test lint demo man clean conformance

all: test

# The venv sees Debian's python3-nftables, hence /usr/bin/python3 and
# --system-site-packages.
$(STAMP): setup.py scripts/install-deps
	./scripts/install-deps
	/usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,man,conformance]'
	touch $@

deps: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) lint
	$(PY) -m pytest -q tests

# The real upstream Qubes code beside ours (doc/conformance.md); the snapshots
# come from QUBES_UPSTREAM_DIR, else ../shared/upstream.
conformance: $(STAMP)
	$(PY) -m pytest -q tests/test_upstream_*.py

demo: $(STAMP)
	$(PY) -m lab.demo

# bench/ is a directory: without .PHONY make would call it up to date.
.PHONY: bench
bench: $(STAMP)
	$(PY) -m bench.run

man: $(STAMP)
	mkdir -p doc/man
	$(VENV)/bin/argparse-manpage --module admin_client_patch.qvm_firewall \
	    --function get_parser --prog qvm-firewall --project-name qubes-network-server \
	    --description "manage a qube's outbound, forward and inbound firewall rules" \
	    --manual-title "Qubes network server" --output doc/man/qvm-firewall.1

clean:
	rm -rf $(VENV) build *.egg-info doc/man
