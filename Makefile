# Two entry points on a machine with only Python 3.10+: `make demo` and `make test`.
# Each creates .venv on first use and installs torch (pinned, CPU build where the index offers
# one) *before* the rest, because an unpinned torch pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
# Extra pip arguments for the torch install only, e.g. an --index-url of a CPU-only wheel index.
TORCH_PIP_ARGS ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.proreflow-installed

.PHONY: install demo test mutation clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	$(PY) -m pip install --quiet -e ".[diffusers,metrics,hf,test]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/proreflow demo --out demo-out --overwrite

test: $(STAMP)
	$(PY) -m pytest

# mutation testing of the algorithm core (issue 27; not part of `make test`): benchmarks/results/mutation.md
mutation: $(STAMP)
	$(PY) -m pip install --quiet -e ".[mutation]"
	$(PY) benchmarks/mutation.py

clean:
	rm -rf $(VENV) demo-out mutants
