# lvd: two commands.
#   make demo   set up .venv, run the whole pipeline on the bundled demo corpus (served on 127.0.0.1), then train
#   make test   set up .venv and run the test suite
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
STAMP  := $(VENV)/.installed

export PATH := $(BIN):$(PATH)
export RAY_USAGE_STATS_ENABLED := 0
# Ray enables token auth on `ray start --head` once ~/.ray/auth_token exists; keep clients in agreement.
export RAY_AUTH_MODE := token

.PHONY: setup demo test clean-demo help

help:
	@echo "make demo   - install, curate the demo corpus on a local Ray head, train briefly (about 5 min)"
	@echo "make test   - install and run the tests"
	@echo "make setup  - only create $(VENV) with the locked dependencies"

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=python3.x, 3.11 or 3.12)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python pipelines/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15 tests

clean-demo:
	rm -rf demo-run
