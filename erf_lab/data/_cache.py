"""The on-disk cache for generated data: ``$ERF_LAB_CACHE``, else ``$XDG_CACHE_HOME/erf-lab``,
else ``~/.cache/erf-lab``. Entries are folders of ``.npy`` files written atomically."""
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np


def cache_dir() -> Path:
    """The cache root (not created)."""
    env = os.environ.get("ERF_LAB_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "erf-lab"


def params_key(params: Dict[str, object]) -> str:
    """A short stable hash of generation parameters (JSON with sorted keys)."""
    blob = json.dumps(params, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cached_arrays(
    name: str, params: Dict[str, object], make: Callable[[], Dict[str, np.ndarray]]
) -> Dict[str, np.ndarray]:
    """Arrays for ``params`` from the cache, or ``make()`` them and store them.

    The entry is written to a temporary folder next to its final place and renamed,
    so readers never see a half-written entry; when the cache is not writable the
    arrays are kept in memory only (with a warning). Arrays are memory-mapped on read.
    """
    root = cache_dir()
    entry = root / f"{name}-{params_key(params)}"
    if (entry / "params.json").is_file():
        try:
            return {p.stem: np.load(p, mmap_mode="r") for p in sorted(entry.glob("*.npy"))}
        except (OSError, ValueError):
            pass  # corrupt entry: rebuild below
    arrays = make()
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=root))
        try:
            for key, value in arrays.items():
                np.save(tmp / f"{key}.npy", value)
            (tmp / "params.json").write_text(json.dumps(params, sort_keys=True, indent=1))
            if entry.exists() and not (entry / "params.json").is_file():
                shutil.rmtree(entry, ignore_errors=True)  # a corrupt entry
            try:
                os.replace(tmp, entry)
            except OSError:
                if not (entry / "params.json").is_file():
                    raise
                # another process stored the same entry first: same parameters, same bytes
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        warnings.warn(f"erf-lab: cannot write the data cache {root} ({exc}); keeping {name} in memory only")
    return arrays


def clear_entry(name: str, params: Dict[str, object]) -> Optional[Path]:
    """Remove one cache entry (returns its path if it existed)."""
    entry = cache_dir() / f"{name}-{params_key(params)}"
    if entry.exists():
        shutil.rmtree(entry)
        return entry
    return None
