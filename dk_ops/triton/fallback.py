"""The reference path behind the Triton ops: what :mod:`dk_ops.triton.ops` computes on a device
whose kernels failed their first-use check, and the oracle :mod:`dk_ops.triton.selfcheck`
compares the kernels with. Same arguments and outputs as the ops (``sizes`` is the nine ints
kernel, stride, padding, dilation (h, w each) and groups)."""
import torch

from .._utils import memory_format_of
from ..reference import deform_kernel_conv2d_reference

__all__ = ["reference_forward", "reference_backward"]


def reference_forward(input, weight, kernel_offset, offset, mask, bias, sizes):
    kh, kw, sh, sw, ph, pw, dh, dw, groups = sizes
    y = deform_kernel_conv2d_reference(input, weight, kernel_offset, offset, mask, bias, (kh, kw), (sh, sw),
                                       (ph, pw), (dh, dw), groups)
    return y.contiguous(memory_format=memory_format_of(input))


def reference_backward(grad, input, weight, kernel_offset, offset, mask, sizes, output_mask):
    """The backward op's outputs computed by autograd through the reference path."""
    args = [input, weight, kernel_offset, offset, mask]
    leaves = [None if a is None else a.detach().requires_grad_() for a in args]
    with torch.inference_mode(False), torch.enable_grad():
        y = reference_forward(*leaves, None, sizes)
        want = [i for i, a in enumerate(leaves) if a is not None and output_mask[i]]
        grads = torch.autograd.grad(y, [leaves[i] for i in want], grad, allow_unused=True) if want else []
    out = [input.new_empty((0,)) for _ in range(6)]
    for i, g in zip(want, grads):
        g = torch.zeros_like(args[i]) if g is None else g
        out[i] = g.contiguous(memory_format=memory_format_of(args[i]))
    if output_mask[5]:
        out[5] = grad.sum(dim=(0, 2, 3))
    return tuple(out)
