// CUDA kernels of dk_ops::deform_kernel_conv2d: the shared algorithms of
// ../deform_kernel_conv2d_impl.h, each step a grid-stride kernel on the current
// stream (64-bit flat indices), plus two CUDA-specific steps:
//  * the depthwise weight gradient (local kernel offsets): one block per output
//    channel reduces its N*K*L contributions into per-warp shared-memory bins
//    (shared atomics only), then writes its S values once: no global atomics at
//    all, and the batch chunks are summed in order by stream order;
//  * the input gradient: each column element adds into its (up to four) input
//    pixels with global atomicAdd (as torchvision's deform_conv2d col2im does).
// float16/bfloat16 inputs are read as such; every buffer and GEMM is float32
// (at::opmath_type), the result is rounded once at the end. float32 and float64
// run natively (GEMMs through at::matmul, i.e. cuBLAS).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../deform_kernel_conv2d_impl.h"

namespace dk_ops {
namespace {

using detail::Params;

constexpr int kThreads = 256;

template <typename F>
__global__ void for_each_kernel(int64_t count, F f) {
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) f(i);
}

// One thread per (row, j): f(row, j, j + 1).
template <typename F>
__global__ void for_rows_kernel(int64_t rows, int64_t inner, F f) {
  const int64_t count = rows * inner;
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    const int64_t r = i / inner, j = i - r * inner;
    f(r, j, j + 1);
  }
}

// One block per output channel o; each warp accumulates into its own S shared-memory
// bins (shared atomics, contended only within the warp), then thread s sums the warps'
// bins in a fixed order and adds them to gW[o, s]: the only writer of that element.
template <typename scalar_t, typename acc_t>
__global__ void gw_depthwise_kernel(Params p, int64_t n0, int64_t nb, const acc_t* __restrict__ gy,
                                    const acc_t* __restrict__ X, const int32_t* __restrict__ kidx,
                                    const acc_t* __restrict__ kwt, acc_t* __restrict__ gw) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* bins = reinterpret_cast<acc_t*>(smem_raw);
  const int warps = blockDim.x / 32;
  const int64_t o = blockIdx.x;
  for (int64_t s = threadIdx.x; s < warps * p.S; s += blockDim.x) bins[s] = acc_t(0);
  __syncthreads();
  acc_t* wbins = bins + (threadIdx.x / 32) * p.S;
  const int64_t c = o / p.Cog;
  const int64_t gk = o / p.Cok;
  const int64_t total = nb * p.K * p.L;
  for (int64_t i = threadIdx.x; i < total; i += blockDim.x) {
    const int64_t l = i % p.L;
    const int64_t t = (i / p.L) % p.K;
    const int64_t n = i / (p.L * p.K);
    const acc_t g = gy[(n * p.Co + o) * p.L + l] * X[((n * p.C + c) * p.K + t) * p.L + l];
    if (g == acc_t(0)) continue;
    const int64_t kb = detail::kcorner_base(p, n0 + n, gk, t, l);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const acc_t v = kwt[kb + q] * g;
      if (v != acc_t(0)) atomicAdd(&wbins[kidx[kb + q]], v);
    }
  }
  __syncthreads();
  for (int64_t s = threadIdx.x; s < p.S; s += blockDim.x) {
    acc_t sum = acc_t(0);
    for (int w = 0; w < warps; ++w) sum += bins[w * p.S + s];
    gw[o * p.S + s] += sum;
  }
}

template <typename acc_t>
__global__ void scatter_input_kernel(Params p, int64_t n0, int64_t nb, const acc_t* __restrict__ gX,
                                     const int32_t* __restrict__ iidx, const acc_t* __restrict__ iw,
                                     acc_t* __restrict__ gin) {
  const int64_t total = nb * p.C * p.K * p.L;
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t l = i % p.L;
    const int64_t t = (i / p.L) % p.K;
    const int64_t c = (i / (p.L * p.K)) % p.C;
    const int64_t n = i / (p.L * p.K * p.C);
    const acc_t v = gX[i];
    if (v == acc_t(0)) continue;
    acc_t* plane = gin + ((n0 + n) * p.C + c) * p.H * p.W;
    if (p.has_off) {
      const int64_t ib = (((n * p.Gi + c / p.Cig) * p.K + t) * p.L + l) * 4;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const acc_t wq = iw[ib + q];
        if (wq != acc_t(0)) atomicAdd(plane + iidx[ib + q], wq * v);
      }
    } else {
      const int64_t r = detail::rigid_index(p, t / p.kw, t % p.kw, l / p.Wo, l % p.Wo);
      if (r >= 0) atomicAdd(plane + r, v);
    }
  }
}

int64_t blocks_for(int64_t count) {
  const int64_t max_blocks = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return std::max<int64_t>(1, std::min<int64_t>((count + kThreads - 1) / kThreads, max_blocks));
}

struct CudaExec {
  static constexpr int kBlock = 1;
  static int64_t chunk_budget() { return int64_t(1) << 30; }
  static bool fused_depthwise_backward() { return false; }
  static bool direct_depthwise_global() { return false; }

  template <typename scalar_t, typename acc_t>
  static void dw_local_backward(const Params&, int64_t, int64_t, const scalar_t*, const scalar_t*, const scalar_t*,
                                const scalar_t*, const int32_t*, const acc_t*, const acc_t*, bool, bool, bool, acc_t*,
                                acc_t*, acc_t*, acc_t*) {
    TORCH_CHECK(false, "dk_ops: no fused depthwise backward on CUDA");
  }

  template <typename F>
  static void for_rows(int64_t rows, int64_t inner, int64_t /*work*/, F f) {
    if (rows <= 0 || inner <= 0) return;
    for_rows_kernel<<<blocks_for(rows * inner), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(rows, inner, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename F>
  static void for_blocks(int64_t rows, int64_t inner, int64_t work, F f) {
    for_rows(rows, inner, work, f);
  }

  template <typename F>
  static void for_each(int64_t count, int64_t /*grain*/, F f) {
    if (count <= 0) return;
    for_each_kernel<<<blocks_for(count), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(count, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename scalar_t, typename acc_t>
  static void gw_depthwise(const Params& p, int64_t n0, int64_t nb, const acc_t* gy, const acc_t* X,
                           const int32_t* kidx, const acc_t* kwt, acc_t* gw) {
    const size_t smem = sizeof(acc_t) * p.S * (kThreads / 32);
    TORCH_CHECK(smem <= 48 * 1024, "dk_ops: scope of ", p.S, " cells is too large for the CUDA weight gradient");
    gw_depthwise_kernel<scalar_t, acc_t>
        <<<p.Co, kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(p, n0, nb, gy, X, kidx, kwt, gw);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename acc_t>
  static void scatter_input(const Params& p, int64_t n0, int64_t nb, const acc_t* gX, const int32_t* iidx,
                            const acc_t* iw, acc_t* gin) {
    const int64_t total = nb * p.C * p.K * p.L;
    if (total == 0) return;
    scatter_input_kernel<acc_t>
        <<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(p, n0, nb, gX, iidx, iw, gin);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

at::Tensor opt(const c10::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->contiguous() : at::Tensor();
}

void check_device(const at::Tensor& input, std::initializer_list<at::Tensor> others) {
  TORCH_CHECK(input.is_cuda(), "dk_ops: CUDA kernel called with a ", input.device(), " tensor");
  for (const auto& t : others) {
    if (t.defined()) {
      TORCH_CHECK(t.device() == input.device(), "dk_ops: all tensors must be on ", input.device(), ", got ",
                  t.device());
      TORCH_CHECK(t.scalar_type() == input.scalar_type(), "dk_ops: all tensors must have dtype ",
                  input.scalar_type(), ", got ", t.scalar_type());
    }
  }
}

at::Tensor forward_cuda(const at::Tensor& input, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& kernel_offset, const c10::optional<at::Tensor>& offset,
                        const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& bias, int64_t kh,
                        int64_t kw, int64_t sth, int64_t stw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                        int64_t groups) {
  at::Tensor x = input.contiguous(), w = weight.contiguous();
  at::Tensor dk = opt(kernel_offset), off = opt(offset), m = opt(mask), b = opt(bias);
  check_device(x, {w, dk, off, m, b});
  const c10::cuda::CUDAGuard guard(x.device());
  const Params p = detail::make_params(x, w, kernel_offset, offset, mask, kh, kw, sth, stw, ph, pw, dh, dw, groups);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "deform_kernel_conv2d_cuda", [&] {
    out = detail::forward_impl<scalar_t, CudaExec>(x, w, dk, off, m, b, p);
  });
  return detail::in_format_of(out, input);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight,
    const c10::optional<at::Tensor>& kernel_offset, const c10::optional<at::Tensor>& offset,
    const c10::optional<at::Tensor>& mask, int64_t kh, int64_t kw, int64_t sth, int64_t stw, int64_t ph, int64_t pw,
    int64_t dh, int64_t dw, int64_t groups, std::array<bool, 6> output_mask) {
  at::Tensor g = grad.contiguous(), x = input.contiguous(), w = weight.contiguous();
  at::Tensor dk = opt(kernel_offset), off = opt(offset), m = opt(mask);
  check_device(x, {w, dk, off, m});
  TORCH_CHECK(g.device() == x.device(), "dk_ops: grad must be on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const Params p = detail::make_params(x, w, kernel_offset, offset, mask, kh, kw, sth, stw, ph, pw, dh, dw, groups);
  TORCH_CHECK(g.dim() == 4 && g.size(0) == p.N && g.size(1) == p.Co && g.size(2) == p.Ho && g.size(3) == p.Wo,
              "dk_ops: grad has shape ", g.sizes(), ", expected (", p.N, ", ", p.Co, ", ", p.Ho, ", ", p.Wo, ")");
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "deform_kernel_conv2d_backward_cuda",
                                  [&] {
                                    out = detail::backward_impl<scalar_t, CudaExec>(g.to(x.scalar_type()), x, w, dk,
                                                                                   off, m, p, output_mask);
                                  });
  return detail::grads_in_formats(out, input, weight, kernel_offset, offset, mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(dk_ops, CUDA, m) {
  m.impl("deform_kernel_conv2d", &forward_cuda);
  m.impl("_deform_kernel_conv2d_backward", &backward_cuda);
}

}  // namespace dk_ops
