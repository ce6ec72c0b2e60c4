# The two commands of the README. Both are idempotent: they create .venv on first use.
#   make demo          set up, then run `edgevlm demo` on the embedded default model
#   make test          set up with test dependencies, then run the test suite (what CI runs); the serving
#                      tests (tests/test_serve.py) run again in .venv-serve, where Triton's server is
# and, for maintainers:
#   make test-latest   the same suite in .venv-latest against today's newest releases (the canary)
#   make lock          rewrite requirements/lock.txt from .venv-latest after `make test-latest` passed
#
# Installs use the known-good versions in requirements/lock.txt. Tests run with PYTHONSAFEPATH=1 so the
# repository root never lands on sys.path (its kernels/, runtime/, ... would shadow installed packages).
PYTHON ?= python3
VENV   ?= .venv
VENV_LATEST ?= .venv-latest
VENV_SERVE ?= .venv-serve
PYTEST = PYTHONSAFEPATH=1 $(1)/bin/python -m pytest -q

.PHONY: demo test test-latest lock setup setup-dev setup-serve clean

demo: setup
	$(VENV)/bin/edgevlm demo

# The serving leg needs Triton's server from nvidia-pytriton, whose wheels are Linux-only.
test: setup-dev
	$(call PYTEST,$(VENV))
	@if [ "$$(uname -s)" = Linux ]; then \
	  ./scripts/setup.sh $(VENV_SERVE) --serve && $(call PYTEST,$(VENV_SERVE)) tests/test_serve.py; \
	else echo "make test: the serving tests need Linux (nvidia-pytriton); skipped on $$(uname -s)"; fi

test-latest:
	./scripts/setup.sh $(VENV_LATEST) --dev --latest
	$(call PYTEST,$(VENV_LATEST))

lock:
	./scripts/lock.sh $(VENV_LATEST) requirements/lock.txt

setup:
	./scripts/setup.sh $(VENV)

setup-dev:
	./scripts/setup.sh $(VENV) --dev

setup-serve:
	./scripts/setup.sh $(VENV_SERVE) --serve

clean:
	rm -rf build $(VENV) $(VENV_LATEST) $(VENV_SERVE)
