"""Every ```python block of README.md runs as written (in a scratch folder holding the ``ckpt.pt``
the snippets name: an erf-lab checkpoint of an untrained study net)."""
import os
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_python_snippets():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_snippet_runs(i, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from dk_ops import models

    monkeypatch.chdir(tmp_path)
    net = models.create("study_net", op="dk", num_classes=10)
    torch.save({"format": "erf-lab-checkpoint", "arch": "study_net", "arch_kwargs": {"op": "dk", "num_classes": 10},
                "state_dict": net.state_dict(), "input_size": [3, 64, 64], "data_spec": "digits-ms"}, "ckpt.pt")
    code = compile(BLOCKS[i], f"README.md python block {i + 1}", "exec")
    exec(code, {"__name__": f"readme_{i}"})  # noqa: S102 - the README's own code
