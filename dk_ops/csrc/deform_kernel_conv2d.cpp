// Schema of the dk_ops operators (one file declaring the schema, like torchvision's
// csrc/ops/*.cpp). Kernels are registered per device in cpu/ and cuda/; the fake
// (meta) kernels and autograd formulas are registered from Python
// (dk_ops/_native.py) with torch.library.register_fake / register_autograd.
#include <torch/library.h>

TORCH_LIBRARY(dk_ops, m) {
  m.def(
      "deform_kernel_conv2d(Tensor input, Tensor weight, Tensor? kernel_offset, Tensor? offset, Tensor? mask, "
      "Tensor? bias, SymInt kernel_h, SymInt kernel_w, SymInt stride_h, SymInt stride_w, SymInt pad_h, "
      "SymInt pad_w, SymInt dilation_h, SymInt dilation_w, SymInt groups) -> Tensor");
  // Gradients of (input, weight, kernel_offset, offset, mask, bias); an entry whose
  // output_mask is false, or whose argument is None, is returned as an empty tensor.
  m.def(
      "_deform_kernel_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor? kernel_offset, "
      "Tensor? offset, Tensor? mask, SymInt kernel_h, SymInt kernel_w, SymInt stride_h, SymInt stride_w, "
      "SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, SymInt groups, bool[6] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
