# The README's Quick start: `make demo` and `make test`. Each target sets up .venv on a fresh machine by itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint install clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, at the tested CPU version, so nothing pulls a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,demo,lmms]"
	# lmms-eval requires torchvision, but the torchvision wheel pip picks here does not match the CPU torch build and
	# breaks `import transformers` model classes; nothing of ours needs it (BardVLProcessor is torchvision-free).
	$(PY) -m pip uninstall -q -y torchvision
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/transformers-bard demo

test: $(STAMP)
	$(PY) -m pytest -q tests

# everything but the end-to-end and multi-process tests (@pytest.mark.slow)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) build dist src/*.egg-info
