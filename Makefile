# erf-lab: the two commands are `make demo` and `make test`.
#
# Both create a local virtualenv (.venv) when it is absent and install the
# package into it in editable mode. torch and torchvision are installed first, as
# a matching pair, and only when the virtualenv cannot already import them:
#
# * no torch yet: TORCH_SPEC (default torch==2.14.1 torchvision==0.29.1). On
#   x86_64 Linux the package index's torchvision links against a CUDA torch, so a
#   CPU-only torch cannot import it; this pair (CUDA builds, which run on the CPU)
#   is the newest one whose wheels lie on this project's machines' local disk.
# * a torch of your own (VENV_FLAGS=--system-site-packages, or installed before):
#   torchvision 0.(minor+15).* to match it, if it is not importable already.
#
# The test extra (timm, openTSNE, ...) is installed after, so pip never replaces
# the torch chosen here. GPU users keep their CUDA torch with
# `make test VENV_FLAGS=--system-site-packages`.

PYTHON      ?= python3
VENV        ?= .venv
VENV_FLAGS  ?=
TORCH_SPEC  ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
DEMO_OUT    ?= results

PY    := $(VENV)/bin/python
STAMP := $(VENV)/.erf-lab-installed

.PHONY: install test demo clean cuda-check

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	@$(PY) -c "import torchvision" 2>/dev/null || $(PY) -m pip install -q $$($(PY) -c \
	  'import torch; v = torch.__version__.split("+")[0]; print("torch==%s torchvision==0.%d.*" % (v, int(v.split(".")[1]) + 15))')
	$(PY) -m pip install -q -e ".[test]"
	@touch $@

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/erf-lab figures --quick --out $(DEMO_OUT)
	@echo "report: $(DEMO_OUT)/index.html and $(DEMO_OUT)/RESULTS.md"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# Compile every dk_ops CUDA source with nvcc (nothing runs; no GPU needed). Uses
# .venv when its torch is a CUDA build (the default pair is), else a CUDA torch in
# its own virtualenv outside the clone (created once, then reused; its nvidia-*
# wheels bring the CUDA library headers the toolkit may lack).
CUDA_VENV       ?= $(HOME)/.cache/erf-lab/cuda-venv
CUDA_TORCH_SPEC ?= torch==2.14.1
NVCC            ?= nvcc

cuda-check: install
	@if $(PY) -c "import torch; assert torch.version.cuda" 2>/dev/null; then \
	  NVCC=$(NVCC) $(PY) scripts/cuda_check.py; \
	else \
	  $(CUDA_VENV)/bin/python -c "import torch; assert torch.version.cuda" 2>/dev/null || \
	    { rm -rf $(CUDA_VENV) && $(PYTHON) -m venv $(CUDA_VENV) && \
	      $(CUDA_VENV)/bin/python -m pip install -q "$(CUDA_TORCH_SPEC)"; }; \
	  NVCC=$(NVCC) $(CUDA_VENV)/bin/python scripts/cuda_check.py; \
	fi
