# Two entry points for a fresh machine: `make serve` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q
STAMP  := $(VENV)/.tandem-installed

.PHONY: serve test test-gpu bench clean

# The venv sees system packages so a CUDA torch already on the machine is kept;
# otherwise the pinned CPU build goes in first (an unpinned torch pulls CUDA wheels).
$(STAMP): pyproject.toml
	python3 -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	touch $@

serve: $(STAMP)
	$(VENV)/bin/tandem serve

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q --durations=25 -m "not gpu" tests

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu tests

clean:
	rm -rf $(VENV) .pytest_cache
