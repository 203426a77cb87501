"""Writing results, shared by every package (erf_lab, analyses, figures, the CLI).

* atomic writes (:func:`atomic_write` and the ``write_*`` helpers built on it): a file is
  complete or absent, never half-written;
* one JSON policy (:func:`jsonable`): numpy values become Python values, paths strings, and
  non-finite floats ``null``, so every JSON file is strict (``allow_nan=False``);
* the checks that a command can write its outputs, made before any work
  (:func:`check_output_dir`, :func:`check_output_file`);
* a registry of the files written so far in this process, for "interrupted; already
  written: ..." messages (:func:`written_files`);
* :func:`versions`, the library versions recorded in every result's metadata.
"""
import json
import math
import os
import platform
import re
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np

PathLike = Union[str, Path]


def atomic_write(path: PathLike, write: Callable[[str], None], fsync: bool = False) -> Path:
    """Call ``write(tmp_path)`` for a temporary file beside ``path``, then rename it onto ``path``.

    Readers never see a half-written file and an interrupt leaves the previous file intact.
    The file gets the usual permissions (``mkstemp`` makes it 0600); ``fsync`` flushes it to
    disk before the rename (for checkpoints).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _record(path)
    return path


# ---- files written so far ---------------------------------------------------------------------
_WRITTEN: List[Path] = []
_CREATED: List[Path] = []  # folders the output checks made, for discard_created
_WRITTEN_KEYS: set = set()
_WRITTEN_LOCK = threading.Lock()


def _record(path: Path) -> None:
    key = os.path.abspath(path)
    with _WRITTEN_LOCK:
        if key not in _WRITTEN_KEYS:
            _WRITTEN_KEYS.add(key)
            _WRITTEN.append(path)


def written_files() -> List[Path]:
    """Every destination :func:`atomic_write` completed in this process since the last
    :func:`reset_written`, in the order first written, each once (as the caller spelled it)."""
    with _WRITTEN_LOCK:
        return list(_WRITTEN)


def reset_written() -> None:
    """Forget the files and folders recorded so far (e.g. at the start of a command)."""
    with _WRITTEN_LOCK:
        _WRITTEN.clear()
        _WRITTEN_KEYS.clear()
        _CREATED.clear()


def discard_created() -> List[Path]:
    """Remove the folders :func:`check_output_dir` / :func:`check_output_file` created since the last
    :func:`reset_written` that are still empty (deepest first), so a command that failed after its
    check leaves nothing behind. Returns the folders removed."""
    with _WRITTEN_LOCK:
        created, _CREATED[:] = list(_CREATED), []
    removed = []
    for p in reversed(created):
        try:
            p.rmdir()  # only succeeds on an empty folder
            removed.append(p)
        except OSError:
            pass
    return removed


# ---- can the outputs be written? ---------------------------------------------------------------
def _reason(exc: OSError) -> str:
    """``[Errno 30] Read-only file system`` (without the probe file's name)."""
    if exc.errno is not None and exc.strerror:
        return f"[Errno {exc.errno}] {exc.strerror}"
    return str(exc) or type(exc).__name__


def _probe(folder: Path) -> None:
    """Create and remove a temporary file in ``folder`` (raises OSError if that is impossible)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".erf-lab-write-test-", suffix=".tmp")
    os.close(fd)
    os.unlink(tmp)


def check_output_dir(path: PathLike, *, what: str = "--out") -> Path:
    """Make sure a command can write into the folder ``path``, before it does any work.

    Creates the folder (and its parents) if absent, refuses an existing non-folder, and proves
    the folder writable by creating and removing a temporary file in it (a folder this call
    created is removed again when that fails). ``what`` names the option in the messages.

    Returns:
        ``Path(path)``.

    Raises:
        ErfLabError: one line, e.g. ``--out results/x: is an existing file, not a folder`` or
        ``cannot write into results/x: [Errno 30] Read-only file system``.
    """
    folder = Path(path)
    _check_dir(folder, f"{what} {folder}" if what else str(folder), "")
    return folder


def _check_dir(folder: Path, label: str, which: str) -> None:
    """:func:`check_output_dir`'s work; messages start with ``label`` and name the folder as ``which``."""
    from .errors import ErfLabError

    subject = f"{which} " if which else ""
    if folder.exists() and not folder.is_dir():
        kind = "an existing file" if folder.is_file() else "a device, pipe or socket"
        raise ErfLabError(f"{label}: {subject}is {kind}, not a folder")
    if folder.is_symlink() and not folder.exists():
        raise ErfLabError(f"{label}: {subject}is a broken symbolic link, not a folder")
    created: List[Path] = []
    if not folder.is_dir():
        missing = [folder] + [p for p in folder.parents if not p.exists()]
        try:
            for p in reversed(missing):
                if not p.exists():
                    p.mkdir()
                    created.append(p)
                    with _WRITTEN_LOCK:
                        _CREATED.append(p)
        except OSError as exc:
            _remove_dirs(created)
            raise ErfLabError(f"{label}: cannot create the folder{' ' + which if which else ''}: {_reason(exc)}") from None
    try:
        _probe(folder)
    except OSError as exc:
        _remove_dirs(created)
        raise ErfLabError(f"cannot write into {folder}: {_reason(exc)}") from None


def _remove_dirs(created: List[Path]) -> None:
    for p in reversed(created):
        try:
            p.rmdir()
        except OSError:
            pass


def check_output_file(path: PathLike, *, what: str = "--out") -> Path:
    """Make sure a command can write the file ``path`` (e.g. ``train``'s checkpoint), before any work.

    Refuses an existing folder and anything that is not a regular file (``/dev/null``, a pipe:
    :func:`atomic_write` would replace it by a regular file), then checks the parent folder as
    :func:`check_output_dir` does (creating it if absent).

    Returns:
        ``Path(path)``.

    Raises:
        ErfLabError: one line, e.g. ``--out results/m.pt: is an existing folder, not a file``.
    """
    from .errors import ErfLabError

    file = Path(path)
    prefix = f"{what} " if what else ""
    label = f"{prefix}{file}"
    if str(path).endswith(("/", os.sep)):  # Path() drops the slash that says "a folder"
        raise ErfLabError(f"{prefix}{path}: ends with a slash (a folder); give a file path such as DIR/model.pt")
    if file.is_dir():
        raise ErfLabError(f"{label}: is an existing folder, not a file")
    if file.exists() and not file.is_file():
        raise ErfLabError(f"{label}: is a device, pipe or socket, not a regular file; give a file path")
    _check_dir(file.parent, label, str(file.parent))
    return file


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
    """Indented strict JSON of :func:`jsonable` ``obj``."""
    return json.dumps(jsonable(obj), indent=2, allow_nan=False)


def write_text(path: PathLike, text: str, fsync: bool = False) -> Path:
    """Writes UTF-8 text atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(text.encode("utf-8")), fsync=fsync)


def write_bytes(path: PathLike, data: bytes) -> Path:
    """Writes bytes atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_json(path: PathLike, obj: Any, fsync: bool = False) -> Path:
    """``obj`` as indented strict JSON (:func:`jsonable`), atomically."""
    return write_text(path, dumps(obj) + "\n", fsync=fsync)


def write_csv(path: PathLike, df: Any, float_format: Optional[str] = "%.6g") -> Path:
    """A pandas DataFrame as CSV (no index; floats to 6 significant digits, or in full with
    ``float_format=None``), atomically."""
    return atomic_write(path, lambda tmp: df.to_csv(tmp, index=False, float_format=float_format))


def write_npz(path: PathLike, **arrays: np.ndarray) -> Path:
    """Compressed ``.npz`` of ``arrays``, atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    return atomic_write(path, write)


def safe_name(name: str) -> str:
    """A file-name-safe version of ``name`` (letters, digits, ``-``, ``_``, ``.``)."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._")
    return s or "model"


def versions(*distributions: str) -> Dict[str, Optional[str]]:
    """Versions recorded with a result: erf_lab, python, numpy and torch, and each named
    distribution (``"scikit-learn"``, ``"openTSNE"``...; None where it is not installed)."""
    from importlib import metadata

    import torch

    from . import __version__

    out: Dict[str, Optional[str]] = {"erf_lab": str(__version__), "python": platform.python_version(),
                                     "numpy": np.__version__, "torch": str(torch.__version__)}
    for dist in distributions:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out
