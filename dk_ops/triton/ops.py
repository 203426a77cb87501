"""torch.library registration of the Triton backend: ``dk_ops_triton::deform_kernel_conv2d`` and
``dk_ops_triton::_deform_kernel_conv2d_backward``, with the native ops' schemas.

They are custom operators (``torch.library.custom_op``) whose implementation launches the
Triton kernels (:mod:`dk_ops.triton._impl`), with fake kernels and autograd registered here,
so that ``torch.compile(fullgraph=True)``, ``torch.export`` and ``torch.library.opcheck`` treat
them as the native ops are treated. (``torch.library.triton_op`` would let inductor see the
kernels, but its fake kernel runs the Python body, which under ``TRITON_INTERPRET=1`` would
launch the interpreter on fake tensors; an opaque custom op behaves the same on a GPU and under
the interpreter, so what CI checks is what a GPU runs.)

Registering imports torch only (not triton): ``import dk_ops`` registers these ops, so a
``torch.export`` program that calls them loads without further imports.

Each implementation first asks :mod:`dk_ops.triton.selfcheck` whether the Triton kernels passed
their first-use check on the tensors' device; where they failed, it computes the reference path
instead (also inside compiled graphs and exported programs, whose backend was chosen at trace
time).
"""
from typing import List, Optional

import torch
from torch import Tensor

from .._utils import conv_out_size, memory_format_of
from .fallback import reference_backward, reference_forward

__all__ = ["NAMESPACE", "forward_op", "backward_op"]

NAMESPACE = "dk_ops_triton"

_FWD_SCHEMA = (
    "(Tensor input, Tensor weight, Tensor? kernel_offset, Tensor? offset, Tensor? mask, Tensor? bias, "
    "SymInt kernel_h, SymInt kernel_w, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, "
    "SymInt dilation_h, SymInt dilation_w, SymInt groups) -> Tensor"
)
_BWD_SCHEMA = (
    "(Tensor grad, Tensor input, Tensor weight, Tensor? kernel_offset, Tensor? offset, Tensor? mask, "
    "SymInt kernel_h, SymInt kernel_w, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, "
    "SymInt dilation_h, SymInt dilation_w, SymInt groups, bool[6] output_mask) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_N_SIZES = 9


def _triton_ok(device: torch.device) -> bool:
    from . import selfcheck

    return selfcheck.passed(device)


@torch.library.custom_op(f"{NAMESPACE}::deform_kernel_conv2d", mutates_args=(), schema=_FWD_SCHEMA)
def forward_op(input: Tensor, weight: Tensor, kernel_offset: Optional[Tensor], offset: Optional[Tensor],
               mask: Optional[Tensor], bias: Optional[Tensor], kernel_h: int, kernel_w: int, stride_h: int,
               stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, groups: int) -> Tensor:
    sizes = (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups)
    if not _triton_ok(input.device):
        return reference_forward(input, weight, kernel_offset, offset, mask, bias, sizes)
    from . import _impl

    return _impl.forward(input, weight, kernel_offset, offset, mask, bias, *sizes)


@torch.library.custom_op(f"{NAMESPACE}::_deform_kernel_conv2d_backward", mutates_args=(), schema=_BWD_SCHEMA)
def backward_op(grad: Tensor, input: Tensor, weight: Tensor, kernel_offset: Optional[Tensor],
                offset: Optional[Tensor], mask: Optional[Tensor], kernel_h: int, kernel_w: int, stride_h: int,
                stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, groups: int,
                output_mask: List[bool]):
    sizes = (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups)
    if not _triton_ok(input.device):
        return reference_backward(grad, input, weight, kernel_offset, offset, mask, sizes, output_mask)
    from . import _impl

    return _impl.backward(grad, input, weight, kernel_offset, offset, mask, *sizes, output_mask)


@forward_op.register_fake
def _fake_forward(input, weight, kernel_offset, offset, mask, bias, kernel_h, kernel_w, stride_h, stride_w, pad_h,
                  pad_w, dilation_h, dilation_w, groups):
    torch._check(input.dim() == 4 and weight.dim() == 4, lambda: "dk_ops: input and weight must be 4-D")
    n, _, h, w = input.shape
    ho = conv_out_size(h, kernel_h, stride_h, pad_h, dilation_h)
    wo = conv_out_size(w, kernel_w, stride_w, pad_w, dilation_w)
    return input.new_empty((n, weight.shape[0], ho, wo)).contiguous(memory_format=memory_format_of(input))


@backward_op.register_fake
def _fake_backward(grad, input, weight, kernel_offset, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h,
                   pad_w, dilation_h, dilation_w, groups, output_mask):
    def like(t, want):
        if want and t is not None:
            return t.new_empty(t.shape).contiguous(memory_format=memory_format_of(t))
        return input.new_empty((0,))

    return (like(input, output_mask[0]), like(weight, output_mask[1]), like(kernel_offset, output_mask[2]),
            like(offset, output_mask[3]), like(mask, output_mask[4]),
            input.new_empty((weight.shape[0],)) if output_mask[5] else input.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    input, weight, kernel_offset, offset, mask, bias = inputs[:6]
    ctx.sizes = inputs[6:]
    ctx.save_for_backward(input, weight, kernel_offset, offset, mask)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    input, weight, kernel_offset, offset, mask = ctx.saved_tensors
    need = [bool(v) for v in ctx.needs_input_grad[:6]]
    need[5] = need[5] and ctx.has_bias
    grads = backward_op(grad, input, weight, kernel_offset, offset, mask, *ctx.sizes, need)
    return tuple(g if want else None for g, want in zip(grads, need)) + (None,) * _N_SIZES


forward_op.register_autograd(_backward, setup_context=_setup_context)
