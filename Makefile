# One-command entry points; each creates .venv on first use, with the exact versions of
# constraints.txt (the ones the test suite was verified with).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIN := -c constraints.txt
LATEST := .venv-latest

.PHONY: setup demo test lint clean latest pins

$(BIN)/rankfold: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade $(PIN) pip
	$(BIN)/pip install --quiet $(PIN) torch==2.13.0
	$(BIN)/pip install --quiet $(PIN) -e '.[test]'
	touch $(BIN)/rankfold

setup: $(BIN)/rankfold

demo: setup
	$(BIN)/rankfold demo --out out/demo

test: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests bench

# The newest releases of everything but torch (2.13.0, CPU) in $(LATEST), then lint and the suite.
# It does not touch constraints.txt; `make pins` does, from $(LATEST), once this has passed.
latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet --upgrade pip
	$(LATEST)/bin/pip install --quiet torch==2.13.0
	$(LATEST)/bin/pip install --quiet --upgrade -e '.[test]'
	$(LATEST)/bin/ruff check src tests bench
	$(LATEST)/bin/python -m pytest -q

pins:
	test -x $(LATEST)/bin/python || { echo "run make latest first"; exit 2; }
	{ sed -n '/^#/p' constraints.txt; $(LATEST)/bin/pip freeze --exclude-editable | grep -v '^rankfold' \
	  | sed 's/+cpu$$//'; $(LATEST)/bin/pip --version | awk '{print "pip==" $$2}'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) $(LATEST) out build src/*.egg-info
