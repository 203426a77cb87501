"""Progress reporting shared by training, evaluation, ERFs, features, t-SNE and the figures.

One factory, :func:`progress`, makes every bar, so that logs stay readable:

* stderr (or ``file``) is a terminal (``isatty()``), or a Jupyter kernel where ``tqdm.auto``
  picks the notebook widget: a ``tqdm.auto`` bar, as before;
* stderr is not a terminal (``erf-lab train ... 2> log``, CI, a pipe): no bar (tqdm's own
  ``disable=None`` convention: no carriage-return updates in the log) but ONE plain line per
  finished bar/stage, written when the bar closes, e.g. ``ERF: 50/50 img in 12.3 s``
  (``features layer3 (gap): 7/8 batch in 2.1 s`` when a loop stopped early);
* ``TQDM_DISABLE`` set to any non-empty value (the installed tqdm, 4.70, treats every non-empty
  value as true, ``0`` included, so we do too): no bar, on a terminal or not; the one-line
  summaries are still printed. tqdm reads ``TQDM_*`` variables once, at import, and only as
  defaults that an explicit ``disable=`` overrides, and every bar here passes one, so this
  module reads ``TQDM_DISABLE`` itself, at each call. Other ``TQDM_*`` settings
  (``TQDM_MININTERVAL``, ``TQDM_NCOLS``...) still reach the terminal bars through tqdm;
* ``enabled=False`` (the ``--no-progress`` flags, non-zero ranks): nothing at all.

A bar made with ``summary=False`` prints no summary line (training's per-batch bars: the epoch
line of :func:`erf_lab.train.train` already says what they would).

Whatever comes back supports what the code base uses of tqdm: iteration, ``update``,
``close``, ``set_postfix``, ``set_postfix_str``, ``set_description``, ``refresh``, ``n``,
``total``, ``disable`` and use as a context manager.
"""
import os
import sys
import time
from typing import Any, Iterable, Iterator, Optional, TextIO

from torch.utils.data import DataLoader

__all__ = ["progress", "loader_bar", "write_line", "bars_shown", "format_seconds"]


def _env_disabled() -> bool:
    return bool(os.environ.get("TQDM_DISABLE", ""))


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except Exception:  # noqa: BLE001 - a closed or odd stream is not a terminal
        return False


def _in_notebook(stream: Any) -> bool:
    """``tqdm.auto`` chose the notebook widget and the bar goes to the kernel's stderr."""
    if stream is not sys.stderr:
        return False
    from tqdm.auto import tqdm as auto_tqdm

    return any(c.__module__ == "tqdm.notebook" for c in auto_tqdm.__mro__)


def bars_shown(file: Optional[TextIO] = None) -> bool:
    """Whether :func:`progress` draws tqdm bars on ``file`` (default: the current ``sys.stderr``)."""
    stream = sys.stderr if file is None else file
    return not _env_disabled() and (_is_tty(stream) or _in_notebook(stream))


def format_seconds(s: float) -> str:
    """``12.3 s``, ``6 min 58 s``, ``2 h 03 min``."""
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        m, sec = divmod(int(round(s)), 60)
        return f"{m} min {sec:02d} s"
    h, m = divmod(int(round(s / 60)), 60)
    return f"{h} h {m:02d} min"


class _LineBar:
    """The stand-in for a bar that is not drawn: counts, and prints one line on close (if ``summary``)."""

    def __init__(self, iterable: Optional[Iterable], total: Optional[float], desc: str, unit: str,
                 file: Optional[TextIO], summary: bool, initial: float = 0) -> None:
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except (TypeError, AttributeError):
                total = None
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.file, self.summary = file, summary
        self.n = initial
        self.postfix = ""
        self.disable = True  # no bar (what tqdm's attribute says)
        self.start_t = time.perf_counter()
        self._closed = False

    # ---- iteration and counting
    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this progress bar was made without an iterable")
        try:
            for obj in self.iterable:
                yield obj
                self.n += 1
        finally:  # also when the loop breaks (the generator is closed) or raises
            self.close()

    def __len__(self) -> int:
        return int(self.total) if self.total is not None else len(self.iterable)  # type: ignore[arg-type]

    def update(self, n: float = 1) -> None:
        self.n += n

    # ---- what tqdm's display methods do here: remember, show nothing
    def set_postfix(self, ordered_dict: Optional[dict] = None, refresh: bool = True, **kwargs: Any) -> None:
        items = dict(ordered_dict or {}, **kwargs)
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def set_description(self, desc: Optional[str] = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    set_description_str = set_description

    def refresh(self, *args: Any, **kwargs: Any) -> None:
        pass

    def clear(self, *args: Any, **kwargs: Any) -> None:
        pass

    def reset(self, total: Optional[float] = None) -> None:
        self.n = 0
        if total is not None:
            self.total = total
        self.start_t = time.perf_counter()

    @property
    def format_dict(self) -> dict:
        return {"n": self.n, "total": self.total, "elapsed": time.perf_counter() - self.start_t,
                "prefix": self.desc, "unit": self.unit, "postfix": self.postfix}

    def line(self) -> str:
        """The summary line (without a newline)."""
        n = int(self.n) if float(self.n).is_integer() else self.n
        count = f"{n}/{int(self.total) if float(self.total).is_integer() else self.total}" if self.total else f"{n}"
        text = f"{self.desc}: " if self.desc else ""
        text += f"{count} {self.unit} in {format_seconds(time.perf_counter() - self.start_t)}"
        return text + (f" ({self.postfix})" if self.postfix else "")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.summary:
            stream = sys.stderr if self.file is None else self.file
            print(self.line(), file=stream, flush=True)

    def __enter__(self) -> "_LineBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @staticmethod
    def write(s: str, file: Optional[TextIO] = None, end: str = "\n", nolock: bool = False) -> None:
        write_line(s, file=file, end=end)


class _Silent(_LineBar):
    """``enabled=False``: iterates and counts, prints nothing."""

    def __init__(self, iterable: Optional[Iterable], total: Optional[float], desc: str, unit: str,
                 initial: float = 0) -> None:
        super().__init__(iterable, total, desc, unit, None, False, initial)


def progress(iterable: Optional[Iterable] = None, *, total: Optional[float] = None, desc: str = "",
             unit: str = "it", enabled: bool = True, summary: bool = True, file: Optional[TextIO] = None,
             **kwargs: Any):
    """A progress bar over ``iterable`` (or a manual one with ``total`` and ``update``).

    Args:
        iterable: what to loop over (its ``len`` is the total unless ``total`` is given).
        total: the expected count.
        desc: the bar's label, also the start of the summary line.
        unit: what is counted (``img``, ``batch``...).
        enabled: False prints nothing (``--no-progress``; ranks other than 0).
        summary: print the one-line summary when no bar is drawn (see the module docstring).
        file: the stream (default: ``sys.stderr`` at the time of the call).
        **kwargs: passed to ``tqdm.auto.tqdm`` when a bar is drawn (``leave``, ``initial``...);
            ``disable=True`` means ``enabled=False``; other ``disable`` values are ignored
            (the terminal test decides).

    Returns:
        a ``tqdm.auto.tqdm`` on a terminal, else a tqdm-compatible stand-in.
    """
    if kwargs.pop("disable", False) is True:
        enabled = False
    initial = kwargs.get("initial", 0)
    if not enabled:
        return _Silent(iterable, total, desc, unit, initial)
    if not bars_shown(file):
        return _LineBar(iterable, total, desc, unit, file, summary, initial)
    from tqdm.auto import tqdm

    if file is not None:
        kwargs["file"] = file
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=False, **kwargs)


def loader_bar(loader: DataLoader, *, desc: str = "", unit: str = "batch", enabled: bool = True, **kwargs: Any):
    """:func:`progress` over one pass of ``loader`` (``len(loader)`` batches).

    The bar gets an iterator, not the loader: ``tqdm.auto`` calls ``iter()`` on an iterable in
    its constructor and again to loop, which made a second loader iterator per pass (with workers:
    a second set of processes and prefetched batches thrown away, and generator draws that made
    the batch order depend on ``num_workers``).
    """
    return progress(iter(loader), total=len(loader), desc=desc, unit=unit, enabled=enabled, **kwargs)


def write_line(msg: str, file: Optional[TextIO] = None, end: str = "\n") -> None:
    """Print ``msg`` (default: to stdout) without breaking a bar drawn on the terminal, and flush
    (redirected stdout is block-buffered: a log would otherwise fill up in chunks)."""
    from tqdm.auto import tqdm

    stream = sys.stdout if file is None else file
    tqdm.write(msg, file=stream, end=end)
    try:
        stream.flush()
    except Exception:  # noqa: BLE001
        pass
