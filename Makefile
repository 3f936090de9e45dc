# `make test` and `make demo` work on a fresh machine: each builds .venv from requirements.lock when it
# is missing or older than the lock (or setup.cfg), so every machine runs the versions the project was
# tested with. `make lock` re-resolves setup.cfg's ranges to today's newest versions and rewrites the lock.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements.lock
EXTRAS := .[test,eval]

# the packages installed in the environment of python $(1), one `name==version` a line as the lock lists
# them: pip itself included, this package (editable) left out, a build's local label such as +cpu dropped
FREEZE = $(1) -m pip freeze --all --exclude-editable | sed -E 's/\+[[:alnum:].]+$$//' | LC_ALL=C sort -f

.PHONY: test test-fast test-fp8 test-compat lint demo install lock check-venv clean

$(STAMP): $(LOCK) setup.cfg pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $$(grep -E '^pip==' $(LOCK))
	# exact versions; `torch==X` takes this machine's CPU build of X where one is on offer
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $(STAMP)

install: $(STAMP)

# exit 1 unless .venv holds exactly the lock's versions and this checkout's package (.ci/run rebuilds it then)
check-venv:
	@test -x $(PY) || { echo ".venv: missing"; exit 1; }
	@diff <(grep -vE '^(#|$$)' $(LOCK)) <($(call FREEZE,$(PY))) | grep '^[<>]' \
		&& { echo ".venv: differs from $(LOCK) (< lock, > .venv)"; exit 1; } || true
	@$(PY) -I -c 'import megatron_mlkv as m, os, sys; sys.exit(not os.path.samefile(m.__file__, sys.argv[1]))' \
		megatron_mlkv/__init__.py || { echo ".venv: megatron_mlkv is not this checkout's"; exit 1; }
	@echo ".venv matches $(LOCK)"

# the newest versions setup.cfg allows, resolved in a scratch environment, become the lock
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q -e '$(EXTRAS)'
	.venv-lock/bin/python -m pip check
	{ echo "# What \`make\` installs (Linux x86-64, $$(.venv-lock/bin/python -V)); written by \`make lock\`, do not edit"; \
	  $(call FREEZE,.venv-lock/bin/python); } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .venv-lock

# the test files spread over the machine's cores (pytest-xdist; a file's tests stay on one worker, so
# they share its fixtures); PYTEST_WORKERS=0 runs them in this process
PYTEST_WORKERS ?= auto
PYTEST := $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

test: $(STAMP)
	$(PYTEST) tests

# ruff (pyproject.toml): lint, and the formatting `ruff format` gives
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-fast: $(STAMP)
	$(PYTEST) -m "not slow" tests

# the float8 tests (tests/test_float8.py, skipped without torchao) with the newest torchao setup.cfg's gpu
# extra allows, installed beside .venv: in .venv itself transformers would import it in every process
FP8_SITE := .fp8-site
test-fp8: $(STAMP)
	rm -rf $(FP8_SITE)
	$(PY) -m pip install -q --no-deps --target $(FP8_SITE) "$$(sed -nE 's/^[[:space:]]*(torchao[<>=][^;#]*).*/\1/p' setup.cfg | head -1 | xargs)"
	PYTHONPATH=$(FP8_SITE) $(PYTEST) tests/test_float8.py tests/test_uptrain.py -k "fp8 or float8"

# the tests marked `compat` in fresh environments of the newest and of the oldest versions setup.cfg admits
test-compat:
	PYTHON=$(PYTHON) tools/test_compat.sh newest oldest

demo: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) launch/demo.py --out demo_out

clean:
	rm -rf $(VENV) .venv-lock .venv-compat $(FP8_SITE) demo_out
