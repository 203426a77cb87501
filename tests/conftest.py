import os

# The Triton kernels are tested on CPU tensors through Triton's interpreter, which is chosen when
# triton is first imported: set it before any test (torch.compile, dk_ops) can import triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Keep the suite's numbers reproducible and its CPU use bounded (CI has 2 cores).
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
