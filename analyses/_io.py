"""Small private helpers shared by the analyses: atomic writes, JSON-safe values, versions."""
import json
import platform
import re
from pathlib import Path
from typing import Any, Dict, Union

import numpy as np

from erf_lab._io import atomic_write, jsonable  # noqa: F401  (re-exported for the analyses)

PathLike = Union[str, Path]


def write_text(path: PathLike, text: str) -> Path:
    """Writes UTF-8 text atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def write_bytes(path: PathLike, data: bytes) -> Path:
    """Writes bytes atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write)


def dumps(obj: Any) -> str:
    """Pretty JSON of :func:`jsonable` ``obj`` (strict: no NaN)."""
    return json.dumps(jsonable(obj), indent=2, sort_keys=False, allow_nan=False)


def versions() -> Dict[str, str]:
    """Versions of the libraries whose behaviour the results depend on."""
    import sklearn
    import torch

    out = {
        "erf_lab": _erf_lab_version(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "scikit-learn": sklearn.__version__,
    }
    try:
        import openTSNE

        out["openTSNE"] = openTSNE.__version__
    except ImportError:
        out["openTSNE"] = None  # type: ignore[assignment]
    return out


def _erf_lab_version() -> str:
    try:
        import erf_lab

        return str(erf_lab.__version__)
    except Exception:  # pragma: no cover - erf_lab ships with analyses
        return "?"


def safe_name(name: str) -> str:
    """A file-name-safe version of ``name`` (letters, digits, ``-``, ``_``, ``.``)."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._")
    return s or "model"
