# The two commands of the README. Both are idempotent: they create .venv on first use.
#   make demo   set up, then run `edgevlm demo` on the embedded default model
#   make test   set up with test dependencies, then run the test suite
PYTHON ?= python3
VENV   ?= .venv

.PHONY: demo test setup setup-dev clean

demo: setup
	$(VENV)/bin/edgevlm demo

test: setup-dev
	$(VENV)/bin/python -m pytest -q

setup:
	./scripts/setup.sh $(VENV)

setup-dev:
	./scripts/setup.sh $(VENV) --dev

clean:
	rm -rf build $(VENV)
