# The README's Quick start: `make demo` and `make test`. Each target sets up .venv on a fresh machine by itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint install clean browser

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, at the tested CPU version, so nothing pulls a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,demo,lmms,app,serve]"
	# lmms-eval requires torchvision, but the torchvision wheel pip picks here does not match the CPU torch build and
	# breaks `import transformers` model classes; nothing of ours needs it (BardVLProcessor is torchvision-free).
	# timm (pulled by lmms-eval for model families we do not use) imports torchvision at import time, and
	# `accelerate launch` imports timm when it is installed: it goes too, or the accelerate command crashes.
	$(PY) -m pip uninstall -q -y torchvision timm
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/transformers-bard demo

# Debian's chromium + chromium-driver for the browser test (tests/test_app.py): installed only when missing; where
# apt-get is not available (or fails), the test is skipped and names what is missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		$(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver \
		|| echo "could not install chromium/chromium-driver: the browser test in tests/test_app.py will be skipped"; \
	else echo "apt-get not available: install chromium and chromium-driver to run the browser test (tests/test_app.py)"; fi

test: $(STAMP) browser
	$(PY) -m pytest -q tests

# everything but the end-to-end and multi-process tests (@pytest.mark.slow)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) build dist src/*.egg-info
