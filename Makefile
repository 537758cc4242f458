# Two commands do everything on a fresh machine: `make demo` and `make test` (`make demo-full`: full sizes).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export XSILO_HOME ?= $(HOME)/.cache/xsilo

.PHONY: demo demo-full test test-fast venv clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[train,dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -ra

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# DEMO=quick (default): seeded samples, about 10 minutes on 2 cores; DEMO=full or `make demo-full`: full sizes.
DEMO ?= quick
demo: $(STAMP)
	DEMO=$(DEMO) bash scripts/demo.sh

demo-full: $(STAMP)
	DEMO=full bash scripts/demo.sh

clean-venv:
	rm -rf $(VENV)
