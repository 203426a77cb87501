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

.PHONY: install test demo clean cuda-check

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	@touch $@

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/erf-lab figures --quick --out $(DEMO_OUT)
	@echo "report: $(DEMO_OUT)/index.html and $(DEMO_OUT)/RESULTS.md"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# Compile every dk_ops CUDA source with nvcc (nothing runs; no GPU needed). The
# CPU torch lacks CUDA headers, so a CUDA torch lives in its own virtualenv
# outside the clone (created once, about 1.5 min from a local wheel mirror, then
# reused; its nvidia-* wheels bring the CUDA library headers the toolkit may lack).
CUDA_VENV       ?= $(HOME)/.cache/erf-lab/cuda-venv
CUDA_TORCH_SPEC ?= torch==2.14.1
NVCC            ?= nvcc

cuda-check:
	@$(CUDA_VENV)/bin/python -c "import torch; assert torch.version.cuda" 2>/dev/null || \
	  { rm -rf $(CUDA_VENV) && $(PYTHON) -m venv $(CUDA_VENV) && \
	    $(CUDA_VENV)/bin/python -m pip install -q "$(CUDA_TORCH_SPEC)"; }
	NVCC=$(NVCC) $(CUDA_VENV)/bin/python scripts/cuda_check.py
