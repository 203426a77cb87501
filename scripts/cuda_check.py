"""Compile every .cu file of dk_ops/csrc with nvcc (compile only; nothing runs).

Run by `make cuda-check` with the Python of a virtualenv that holds a CUDA build of
torch (its headers, and the nvidia-* wheels' CUDA headers under
site-packages/nvidia/cu13/include, which a bare CUDA toolkit may lack). Uses the
same nvcc flags as the JIT build (dk_ops/_native.py) plus torch's common flags.
"""
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dk_ops import _native  # noqa: E402  (imports torch only; builds nothing)


def main() -> int:
    if torch.version.cuda is None:
        print(f"cuda-check: {sys.executable} has a CPU-only torch {torch.__version__}", file=sys.stderr)
        return 2
    nvcc = os.environ.get("NVCC", "nvcc")
    site = Path(torch.__file__).resolve().parents[1]
    includes = list(cpp_extension.include_paths(device_type="cuda"))
    includes += [str(p) for p in sorted((site / "nvidia").glob("*/include"))]
    includes += [str(p) for p in sorted((site / "nvidia").glob("*/*/include"))]
    import sysconfig

    includes.append(sysconfig.get_paths()["include"])
    arch = os.environ.get("CUDA_CHECK_ARCH", "-gencode=arch=compute_90,code=sm_90")
    flags = (["-std=c++20", "-Xcompiler", "-fPIC", "-DTORCH_EXTENSION_NAME=dk_ops_check",
              "-DTORCH_API_INCLUDE_EXTENSION_H"] + list(cpp_extension.COMMON_NVCC_FLAGS)
             + list(_native._CUDA_FLAGS) + arch.split())
    sources = sorted((ROOT / "dk_ops" / "csrc").rglob("*.cu"))
    if not sources:
        print("cuda-check: no .cu files", file=sys.stderr)
        return 1
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for src in sources:
            obj = Path(tmp) / (src.stem + ".o")
            cmd = [nvcc, "-c", str(src), "-o", str(obj)] + flags + [f"-I{p}" for p in includes]
            t0 = time.time()
            r = subprocess.run(cmd, capture_output=True, text=True)
            rel = src.relative_to(ROOT)
            if r.returncode != 0:
                failed += 1
                print(f"cuda-check: FAILED {rel} ({time.time() - t0:.0f} s)\n{' '.join(cmd)}\n{r.stdout}{r.stderr}")
            else:
                warn = [ln for ln in (r.stdout + r.stderr).splitlines() if "warning" in ln.lower()]
                print(f"cuda-check: ok {rel} ({time.time() - t0:.0f} s, {obj.stat().st_size // 1024} KiB object, "
                      f"{len(warn)} warnings; torch {torch.__version__}, {arch})")
                for ln in warn[:10]:
                    print("  " + ln)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
