# Commands for a fresh machine; each makes the virtual environment when it is missing.
#   make demo   MLP-4 vanilla vs MLP-4 + NSR on scikit-learn's digits (no download); its time: docs/speed.md
#   make test   the test suite (what CI runs: `bash .ci/run`)
#   make test-quick   the suite without the tests marked slow (processes, NNI, DDP, pip), for the edit-test loop
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-quick bench clean
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[all,test]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python -m nsr demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest tests

test-quick: $(BIN)/.installed
	$(BIN)/python -m pytest -m "not slow" tests

bench: $(BIN)/.installed
	$(BIN)/python bench/nsr_overhead.py
	$(BIN)/python bench/cnn_step.py

clean:
	rm -rf $(VENV) *.egg-info
