# Two commands do everything on a fresh machine:
#   make demo   create .venv, install, run one benchmark cell on the embedded data
#   make test   create .venv, install, run the tests
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PROFILE ?= tiny
STAMP   := $(VENV)/.installed

.PHONY: install demo test clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/defbench run --attack badencoder --defense ft --profile $(PROFILE)

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
