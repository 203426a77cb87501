"""Progress output for logs (erf_lab.progress), output checks made before any work
(erf_lab.io.check_output_dir / check_output_file in train, t-SNE and figures), and the
registry of completed writes (erf_lab.io.written_files)."""
import errno
import io
import os
import subprocess

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from tqdm.std import tqdm as std_tqdm

import erf_lab.io as eio
from erf_lab.io import atomic_write, check_output_dir, check_output_file, reset_written, written_files
from erf_lab.progress import loader_bar, progress
from erf_lab.errors import ErfLabError


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(autouse=True)
def _no_tqdm_env(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)


def _run_bars(file=None):
    """Three bars of the kinds the code base uses: iteration, manual updates, a loader."""
    for _ in progress(range(5), desc="ERF", unit="img", file=file):
        pass
    with progress(total=3, desc="t-SNE", unit="iter", file=file, leave=False) as bar:
        bar.update(2)
        bar.update(bar.total - bar.n)
        bar.set_postfix(loss="0.123")
    loader = DataLoader(TensorDataset(torch.zeros(6, 1)), batch_size=2)
    for _ in loader_bar(loader, desc="features", leave=False, file=file):
        pass


# ---- progress -----------------------------------------------------------------------------------
def test_non_tty_prints_one_plain_line_per_bar(capsys):
    buf = io.StringIO()
    _run_bars(buf)
    text = buf.getvalue()
    assert "\r" not in text
    assert text.splitlines() == [line for line in text.splitlines() if line.strip()]
    lines = text.splitlines()
    assert len(lines) == 3, text
    assert lines[0].startswith("ERF: 5/5 img in ") and lines[0].endswith(" s")
    assert lines[1].startswith("t-SNE: 3/3 iter in ") and lines[1].endswith("(loss=0.123)")
    assert lines[2].startswith("features: 3/3 batch in ")
    # the default stream is the current sys.stderr (captured here: not a terminal)
    _run_bars()
    out = capsys.readouterr()
    assert out.out == "" and "\r" not in out.err and len(out.err.splitlines()) == 3


def test_non_tty_line_counts_a_loop_that_stopped_early():
    buf = io.StringIO()
    for i in progress(range(10), desc="epoch 1/3 train", unit="batch", file=buf):
        if i == 3:
            break
    assert buf.getvalue().startswith("epoch 1/3 train: 3/10 batch in ") and buf.getvalue().count("\n") == 1


def test_fake_tty_gets_a_tqdm_bar():
    tty = FakeTTY()
    bar = progress(range(4), desc="ERF", unit="img", file=tty)
    assert isinstance(bar, std_tqdm) and not bar.disable
    assert list(bar) == [0, 1, 2, 3]
    assert "\r" in tty.getvalue() and "ERF" in tty.getvalue() and "4/4" in tty.getvalue()


@pytest.mark.parametrize("value", ["1", "0", "true"])
def test_tqdm_disable_removes_bars_but_keeps_the_lines(monkeypatch, value):
    """tqdm 4.70 treats any non-empty TQDM_DISABLE (even "0") as true; so does progress()."""
    monkeypatch.setenv("TQDM_DISABLE", value)
    for stream in (FakeTTY(), io.StringIO()):
        bar = progress(range(2), desc="ERF", unit="img", file=stream)
        assert not isinstance(bar, std_tqdm)
        list(bar)
        assert "\r" not in stream.getvalue() and stream.getvalue().startswith("ERF: 2/2 img in ")
    monkeypatch.setenv("TQDM_DISABLE", "")
    assert isinstance(progress(range(2), file=FakeTTY()), std_tqdm)


def test_disabled_bars_print_nothing_anywhere(capsys):
    for stream in (FakeTTY(), io.StringIO(), None):
        for bar in (progress(range(3), desc="x", enabled=False, file=stream),
                    progress(range(3), desc="x", disable=True, file=stream),  # tqdm's spelling
                    progress(range(3), desc="x", summary=False, file=stream if not isinstance(stream, FakeTTY) else None)):
            assert list(bar) == [0, 1, 2]
            bar.set_postfix(a=1)
            bar.close()
        if stream is not None:
            assert stream.getvalue() == ""
    assert capsys.readouterr() == ("", "")


def test_train_prints_one_line_per_epoch_and_no_carriage_returns(tmp_path, monkeypatch, capsys):
    from erf_lab.data import open_data
    from erf_lab.train import train

    monkeypatch.setenv("ERF_LAB_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster on a busy 2-core machine
    try:
        # the first use renders and caches the data under a bar of erf_lab/data/digits_ms.py (not
        # made by progress(), so it still draws on a non-terminal): done before the capture
        open_data("digits-ms:size=32,renders=1", split="train")
        capsys.readouterr()
        train("study_net", "conv", "digits-ms:size=32,renders=1", 2, tmp_path / "m.pt",
              arch_kwargs={"widths": (8, 16), "depth": 1, "stem_width": 8}, max_train_images=32, max_eval_images=16,
              batch_size=16, progress=True)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    assert "\r" not in out.out and "\r" not in out.err
    epochs = [line for line in out.out.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"]
    assert all("train loss" in line and "acc" in line and "val acc" in line and line.endswith("s") for line in epochs)
    # per-batch bars say nothing (the epoch lines do); the final test is one line
    err = out.err.splitlines()
    assert len(err) == 1 and err[0].startswith("test: 1/1 batch in "), out.err


# ---- output checks ------------------------------------------------------------------------------
def _writable(d):
    try:
        (d / ".probe").write_text("x")
        (d / ".probe").unlink()
        return True
    except OSError:
        return False


@pytest.fixture
def unwritable_dir(tmp_path, monkeypatch):
    """A folder the process cannot write into. The tests run as root, for whom chmod 0o555
    changes nothing, so the folder is made immutable with ``chattr +i`` (removed afterwards).
    Where chattr does not work (no permission, a file system without the flag), the write probe
    of erf_lab.io is monkeypatched to raise PermissionError for this folder instead: that checks
    the error path but not that a real unwritable folder is detected."""
    d = tmp_path / "locked"
    d.mkdir()
    locked = subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode == 0 if _has_chattr() else False
    try:
        if not locked or _writable(d):
            real = eio._probe

            def probe(folder):
                if os.path.abspath(folder) == os.path.abspath(d):
                    raise PermissionError(errno.EACCES, "Permission denied")
                real(folder)

            monkeypatch.setattr(eio, "_probe", probe)
        yield d
    finally:
        if locked:
            subprocess.run(["chattr", "-i", str(d)], capture_output=True)


def _has_chattr():
    from shutil import which

    return which("chattr") is not None


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_check_output_dir(tmp_path, unwritable_dir):
    new = tmp_path / "a" / "b"
    assert check_output_dir(new) == new and new.is_dir() and list(new.iterdir()) == []
    assert check_output_dir(new) == new  # existing, writable
    (tmp_path / "f.txt").write_text("x")
    before = _tree(tmp_path)
    cases = {
        str(tmp_path / "f.txt"): "is an existing file, not a folder",
        "/dev/null": "is a device, pipe or socket, not a folder",
        str(tmp_path / "f.txt" / "sub"): "cannot create the folder",
        str(unwritable_dir): f"cannot write into {unwritable_dir}: [Errno ",
    }
    for path, msg in cases.items():
        with pytest.raises(ErfLabError) as e:
            check_output_dir(path)
        assert msg in str(e.value) and "\n" not in str(e.value) and ".erf-lab-write-test" not in str(e.value)
    with pytest.raises(ErfLabError, match=r"^--out .*f.txt: is an existing file, not a folder$"):
        check_output_dir(tmp_path / "f.txt")
    assert _tree(tmp_path) == before


def test_check_output_dir_removes_what_it_created_when_the_probe_fails(tmp_path, monkeypatch):
    def probe(folder):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(eio, "_probe", probe)
    with pytest.raises(ErfLabError, match=r"cannot write into .*c: \[Errno 28\] No space left on device$"):
        check_output_dir(tmp_path / "a" / "b" / "c")
    assert _tree(tmp_path) == []


def test_check_output_file(tmp_path, unwritable_dir):
    assert check_output_file(tmp_path / "new" / "m.pt") == tmp_path / "new" / "m.pt"
    assert (tmp_path / "new").is_dir() and not (tmp_path / "new" / "m.pt").exists()
    (tmp_path / "old.pt").write_text("x")
    assert check_output_file(tmp_path / "old.pt").read_text() == "x"  # an existing file is fine, untouched
    before = _tree(tmp_path)
    cases = {
        str(tmp_path / "new"): "is an existing folder, not a file",
        "/dev/null": "is a device, pipe or socket, not a regular file",
        str(tmp_path / "old.pt" / "m.pt"): f"{tmp_path / 'old.pt'} is an existing file, not a folder",
        str(unwritable_dir / "m.pt"): "cannot write into",
        str(tmp_path / "x") + "/": "x/: ends with a slash (a folder); give a file path",
    }
    for path, msg in cases.items():
        with pytest.raises(ErfLabError) as e:
            check_output_file(path, what="--out")
        assert msg in str(e.value) and "\n" not in str(e.value)
    assert _tree(tmp_path) == before


def _no_work(monkeypatch):
    """Make every first step of real work fail loudly: the checks must come before them."""
    import erf_lab.checkpoint
    import erf_lab.data
    import figures.run

    def reached(*args, **kwargs):
        raise AssertionError("work started before the output check")

    monkeypatch.setattr(erf_lab.data, "open_data", reached)
    monkeypatch.setattr(erf_lab.checkpoint, "load_model", reached)
    monkeypatch.setattr(figures.run, "prepare_models", reached)
    import figures.theory

    monkeypatch.setattr(figures.theory, "linear_erf_theory", reached)


def _bad_outs(tmp_path, unwritable_dir, file_like):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "folder").mkdir(exist_ok=True)
    bad = ["/dev/null", str(tmp_path / "file.txt" / ("m.pt" if file_like else "sub")),
           str(unwritable_dir / ("m.pt" if file_like else "sub"))]
    bad.append(str(tmp_path / ("folder" if file_like else "file.txt")))
    return bad


def test_train_checks_its_outputs_before_any_work(tmp_path, unwritable_dir, monkeypatch):
    from erf_lab.train import train

    _no_work(monkeypatch)
    for out in _bad_outs(tmp_path, unwritable_dir, file_like=True):
        before = _tree(tmp_path)
        with pytest.raises(ErfLabError):
            train("study_net", "conv", "digits-ms", 1, out, progress=False)
        assert _tree(tmp_path) == before, out
    # a companion that is a folder is refused too
    (tmp_path / "m.last.pt").mkdir()
    with pytest.raises(ErfLabError, match="m.last.pt: is an existing folder, not a file"):
        train("study_net", "conv", "digits-ms", 1, tmp_path / "m.pt", progress=False)
    assert not (tmp_path / "m.pt").exists()


def test_tsne_checks_its_out_folder_before_any_work(tmp_path, unwritable_dir, monkeypatch):
    from analyses.tsne import run_tsne

    _no_work(monkeypatch)
    for out in _bad_outs(tmp_path, unwritable_dir, file_like=False):
        before = _tree(tmp_path)
        with pytest.raises(ErfLabError):
            run_tsne([str(tmp_path / "missing.pt")], out=out, progress=False)
        assert _tree(tmp_path) == before, out


def test_figures_check_their_out_folder_before_any_work(tmp_path, unwritable_dir, monkeypatch):
    from figures.run import run_figures

    _no_work(monkeypatch)
    for out in _bad_outs(tmp_path, unwritable_dir, file_like=False):
        for only in (["theory"], ["accuracy"]):
            before = _tree(tmp_path)
            with pytest.raises(ErfLabError):
                run_figures(out, only=only, progress=False)
            assert _tree(tmp_path) == before, out


def test_cli_train_to_dev_null_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    import cli

    _no_work(monkeypatch)
    assert cli.main(["train", "--arch", "study_net", "--out", "/dev/null", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "/dev/null: is a device, pipe or socket" in err[0]


# ---- files written so far -----------------------------------------------------------------------
def test_written_files_registry(tmp_path):
    reset_written()
    a, b = tmp_path / "a.txt", tmp_path / "sub" / "b.txt"
    atomic_write(a, lambda tmp: open(tmp, "w").write("1"))
    atomic_write(b, lambda tmp: open(tmp, "w").write("2"))
    atomic_write(a, lambda tmp: open(tmp, "w").write("3"))  # written again: listed once

    def fails(tmp):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "c.txt", fails)  # not completed: not listed
    assert written_files() == [a, b]
    written_files().clear()  # a copy
    assert written_files() == [a, b]
    from erf_lab.io import write_text  # every layer's writers go through atomic_write

    write_text(tmp_path / "d.txt", "x")
    assert written_files() == [a, b, tmp_path / "d.txt"]
    reset_written()
    assert written_files() == []
