"""Small private helpers shared by the analyses: atomic writes, JSON-safe values, versions."""
import json
import math
import os
import platform
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Union

import numpy as np

PathLike = Union[str, Path]


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Calls ``write(tmp_path)`` and renames the result onto ``path``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


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


def jsonable(v: Any) -> Any:
    """``v`` with numpy scalars/arrays turned into Python values and non-finite floats into None."""
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return jsonable(v.tolist())
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return v if math.isfinite(v) else None
    if isinstance(v, Path):
        return str(v)
    return v


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
