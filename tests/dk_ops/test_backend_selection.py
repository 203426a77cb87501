"""Backend selection (dk_ops.backend): DK_OPS_BACKEND, the Triton backend's availability and its
per-device self-check, backend_info and `erf-lab ops`. No kernel runs here; CUDA devices are named
("cuda:0"), never touched, so the CUDA rules are checked on a machine without a GPU.
"""
import os
import subprocess
import sys

import pytest
import torch

from dk_ops import _native, backend
from dk_ops import triton as dk_triton
from dk_ops.triton import selfcheck

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CUDA0 = torch.device("cuda:0")


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    for var in ("DK_OPS_BACKEND", "TRITON_INTERPRET", "DK_OPS_SELF_CHECK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(selfcheck, "_results", {})
    yield


@pytest.fixture
def no_native(monkeypatch):
    """The native kernels are unavailable (nothing is built)."""
    monkeypatch.setattr(_native, "load", lambda: False)
    monkeypatch.setattr(_native, "is_loaded", lambda: False)
    monkeypatch.setattr(_native, "has_cuda", lambda: False)


@pytest.fixture
def triton_ok(monkeypatch):
    monkeypatch.setattr(dk_triton, "load", lambda: True)


@pytest.fixture
def no_triton(monkeypatch):
    monkeypatch.setattr(dk_triton, "load", lambda: False)
    monkeypatch.setitem(dk_triton._state, "error", "ModuleNotFoundError: No module named 'triton'")


def checked(device, ok, detail="x"):
    selfcheck._results[str(device)] = {"ok": ok, "detail": detail}


def test_unknown_mode_is_an_error(monkeypatch):
    monkeypatch.setenv("DK_OPS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="DK_OPS_BACKEND must be one of auto, native, reference, triton, cuda"):
        backend.selected_backend("cpu")


def test_cpu_rules(monkeypatch, no_native, triton_ok):
    assert backend.selected_backend("cpu") == "reference"  # auto without native kernels
    monkeypatch.setenv("DK_OPS_BACKEND", "cuda")  # affects CUDA tensors only
    assert backend.selected_backend("cpu") == "reference"
    monkeypatch.setenv("DK_OPS_BACKEND", "native")
    with pytest.raises(RuntimeError, match="DK_OPS_BACKEND=native but native kernels are unavailable on cpu"):
        backend.selected_backend("cpu")
    monkeypatch.setenv("DK_OPS_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend.selected_backend("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.selected_backend("cpu") == "triton"  # the testing contract
    monkeypatch.setenv("DK_OPS_BACKEND", "reference")
    assert backend.selected_backend("cpu") == "reference"


def test_cpu_auto_uses_native_where_it_is_loaded(monkeypatch, triton_ok):
    monkeypatch.setattr(_native, "load", lambda: True)
    assert backend.selected_backend("cpu") == "native"
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter alone does not select Triton on the CPU
    assert backend.selected_backend("cpu") == "native"


def test_cuda_auto_is_triton_after_a_passed_self_check(triton_ok, no_native):
    checked(CUDA0, True)
    assert backend.selected_backend(CUDA0) == "triton"


def test_cuda_auto_falls_back_to_the_reference_after_a_failed_self_check(monkeypatch, triton_ok, no_native):
    checked(CUDA0, False, "output relative error 3.1e-01 > 1e-04")
    checked("cuda:1", True)
    assert backend.selected_backend(CUDA0) == "reference"
    assert backend.selected_backend("cuda:1") == "triton"
    info = backend.backend_info()
    if torch.version.cuda is not None:  # a CPU-only torch reports that first
        assert "reference on cuda:0 (failed the self-check)" in info["cuda"]
    assert "cuda:0 FAILED" in info["triton"] and "output relative error" in info["triton"]
    monkeypatch.setenv("DK_OPS_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="DK_OPS_BACKEND=triton .*self-check on cuda:0: output relative error"):
        backend.selected_backend(CUDA0)
    monkeypatch.setenv("DK_OPS_SELF_CHECK", "0")  # the check (and its verdict) switched off
    assert backend.selected_backend(CUDA0) == "triton"


def test_cuda_without_triton(monkeypatch, no_triton, no_native):
    assert backend.selected_backend(CUDA0) == "reference"
    assert "triton is unavailable (ModuleNotFoundError" in backend.backend_info()["cuda"] or torch.version.cuda is None
    monkeypatch.setenv("DK_OPS_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="triton is unavailable"):
        backend.selected_backend(CUDA0)


def test_cuda_cpp_kernels_are_opt_in(monkeypatch, triton_ok):
    """auto never picks the CUDA C++ extension, even where it is built; DK_OPS_BACKEND=cuda (or native)
    requires it."""
    monkeypatch.setattr(_native, "load", lambda: True)
    monkeypatch.setattr(_native, "has_cuda", lambda: True)
    checked(CUDA0, True)
    assert backend.selected_backend(CUDA0) == "triton"
    for mode in ("cuda", "native"):
        monkeypatch.setenv("DK_OPS_BACKEND", mode)
        assert backend.selected_backend(CUDA0) == "native"
    monkeypatch.setattr(_native, "has_cuda", lambda: False)
    monkeypatch.setenv("DK_OPS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="DK_OPS_BACKEND=cuda but native kernels are unavailable on cuda:0"):
        backend.selected_backend(CUDA0)


def test_reference_mode_everywhere(monkeypatch):
    monkeypatch.setenv("DK_OPS_BACKEND", "reference")
    assert backend.selected_backend("cpu") == backend.selected_backend(CUDA0) == "reference"
    info = backend.backend_info()
    assert info["cpu"].startswith("reference") and info["cuda"].startswith("reference")
    assert info["triton"] == "not used"


def test_backend_info_keys_and_triton_line(monkeypatch):
    info = backend.backend_info()
    assert set(info) == {"mode", "cpu", "cuda", "native", "triton"}
    if dk_triton.load():
        assert info["triton"].startswith(f"triton {dk_triton.status()['version']}")
        assert "self-check on first use per CUDA device" in info["triton"]
    else:
        assert info["triton"].startswith("unavailable")
    monkeypatch.setenv("DK_OPS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    info = backend.backend_info()
    if dk_triton.load():
        assert info["cpu"].startswith("triton (Triton's interpreter")
        assert "interpreter" in info["triton"]


def test_import_dk_ops_registers_the_triton_ops_without_importing_triton():
    code = ("import sys, torch, dk_ops; assert 'triton' not in sys.modules, 'triton imported'; "
            "print(torch.ops.dk_ops_triton.deform_kernel_conv2d.default, "
            "torch.ops.dk_ops_triton._deform_kernel_conv2d_backward.default)")
    env = {k: v for k, v in os.environ.items() if k not in ("DK_OPS_BACKEND", "TRITON_INTERPRET")}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "dk_ops_triton.deform_kernel_conv2d.default" in r.stdout


def test_erf_lab_ops_prints_the_triton_line():
    env = {k: v for k, v in os.environ.items() if k not in ("DK_OPS_BACKEND", "TRITON_INTERPRET")}
    r = subprocess.run([sys.executable, "-c", "import sys, cli; sys.exit(cli.main(['ops']))"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    keys = [line.split(":", 1)[0] for line in r.stdout.splitlines()]
    assert keys == ["mode", "cpu", "cuda", "native", "triton"], r.stdout
