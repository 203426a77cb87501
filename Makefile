# erf-lab: the two commands are `make demo` and `make test`.
#
# Both create a local virtualenv (.venv) when it is absent and install the
# package into it in editable mode. torch is installed first, and only when the
# virtualenv cannot already import it: by default the CPU-only wheel
# (TORCH_SPEC=torch==2.13.0), which is fast to install. GPU users keep their
# own torch with `make test VENV_FLAGS=--system-site-packages` (the venv then
# sees the system torch and installs none) or pick one with TORCH_SPEC=...

PYTHON      ?= python3
VENV        ?= .venv
VENV_FLAGS  ?=
TORCH_SPEC  ?= torch==2.13.0
PYTEST_ARGS ?=
DEMO_OUT    ?= results

PY    := $(VENV)/bin/python
STAMP := $(VENV)/.erf-lab-installed

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	@touch $@

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/erf-lab --help
	$(PY) -m dk_ops.demo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
