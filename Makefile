# The two quick-start targets (`make demo`, `make test`) and the gates CI runs.
# Everything installs into .venv from PyPI; system packages (gnome-keyring, dbus) come from .ci/run.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test gates pytest clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/tokend demo

gates: $(BIN)/.installed
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy --strict tokend
	$(BIN)/mypy tests
	$(BIN)/mypy --strict contrib/python

# The suite runs under coverage (daemon and CLI subprocesses included) and must keep 90 %.
# pytest exits 5 when it collected nothing: that is a failure here, never a pass.
pytest: $(BIN)/.installed
	@rm -f .coverage .coverage.*
	@$(BIN)/coverage run -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; \
	[ $$rc -eq 0 ] || exit $$rc
	@$(BIN)/coverage combine -q
	@$(BIN)/coverage report --fail-under=90

test: gates pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
