# Qubes network server. `make demo` runs the main job, `make test` the tests.
# Both install what they need (Debian packages via apt-get, PyPI into .venv).

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: all deps test lint demo man rpm deb clean conformance screenshots

all: test

# The venv sees Debian's python3-nftables, hence /usr/bin/python3 and
# --system-site-packages.
$(STAMP): setup.py scripts/install-deps
	./scripts/install-deps
	/usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,man,gui,conformance]'
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
	$(PY) packaging/build.py man --prog qvm-firewall --out doc/man/qvm-firewall.1

# Qubes packages into build/packages (packaging/build.py; doc/install.md).
rpm: $(STAMP)
	$(PY) packaging/build.py rpm

deb: $(STAMP)
	$(PY) packaging/build.py deb

# The GUI screenshots in doc/gui/, taken by the GUI tests (needs root: the lab).
screenshots: $(STAMP)
	QNS_SCREENSHOT_DIR=doc/gui $(PY) -m pytest -q tests/test_gui_dialogs.py \
	    tests/test_lab_gui.py tests/test_lab_qube_manager.py

clean:
	rm -rf $(VENV) build *.egg-info doc/man
