// CPU kernels of dk_ops::deform_kernel_conv2d: the shared algorithms of
// ../deform_kernel_conv2d_impl.h run with at::parallel_for. float32 and float64
// natively; float16/bfloat16 are computed in float32 (as the reference does).
// Every reduction has one owner per output element, so results (the weight
// gradient included) are bitwise reproducible for a given thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../deform_kernel_conv2d_impl.h"

namespace dk_ops {
namespace {

using detail::Params;

struct CpuExec {
  static constexpr int kBlock = 64;
  static int64_t chunk_budget() { return int64_t(64) << 20; }

  template <typename F>
  static void for_each(int64_t count, int64_t grain, const F& f) {
    if (count <= 0) return;
    at::parallel_for(0, count, grain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) f(i);
    });
  }

  // f(row, 0, inner) for every row.
  template <typename F>
  static void for_rows(int64_t rows, int64_t inner, int64_t work, const F& f) {
    if (rows <= 0 || inner <= 0) return;
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, inner * work));
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) f(r, 0, inner);
    });
  }

  // f(row, j0, j1) over blocks of at most kBlock inner elements.
  template <typename F>
  static void for_blocks(int64_t rows, int64_t inner, int64_t work, const F& f) {
    if (rows <= 0 || inner <= 0) return;
    const int64_t nblk = (inner + kBlock - 1) / kBlock;
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, kBlock * work));
    at::parallel_for(0, rows * nblk, grain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t r = i / nblk, j0 = (i % nblk) * kBlock;
        f(r, j0, std::min(inner, j0 + kBlock));
      }
    });
  }

  // Depthwise weight gradient with local kernel offsets: one owner per output channel.
  template <typename scalar_t, typename acc_t>
  static void gw_depthwise(const Params& p, int64_t n0, int64_t nb, const acc_t* gy, const acc_t* X,
                           const int32_t* kidx, const acc_t* kwt, acc_t* gw) {
    at::parallel_for(0, p.Co, 1, [&](int64_t b, int64_t e) {
      for (int64_t o = b; o < e; ++o) {
        const int64_t c = o / p.Cog;
        const int64_t gk = o / p.Cok;
        acc_t* gwo = gw + o * p.S;
        for (int64_t n = 0; n < nb; ++n) {
          const acc_t* gyr = gy + (n * p.Co + o) * p.L;
          for (int64_t t = 0; t < p.K; ++t) {
            const acc_t* xr = X + ((n * p.C + c) * p.K + t) * p.L;
            const int64_t kb = detail::kcorner_base(p, n0 + n, gk, t, 0);
            const int32_t* ki = kidx + kb;
            const acc_t* kw = kwt + kb;
            for (int64_t l = 0; l < p.L; ++l) {
              const acc_t g = gyr[l] * xr[l];
              gwo[ki[4 * l + 0]] += kw[4 * l + 0] * g;
              gwo[ki[4 * l + 1]] += kw[4 * l + 1] * g;
              gwo[ki[4 * l + 2]] += kw[4 * l + 2] * g;
              gwo[ki[4 * l + 3]] += kw[4 * l + 3] * g;
            }
          }
        }
      }
    });
  }

  // Input gradient: each (n, c) plane has one owner that scatters its columns' gradient.
  template <typename acc_t>
  static void scatter_input(const Params& p, int64_t n0, int64_t nb, const acc_t* gX, const int32_t* iidx,
                            const acc_t* iw, acc_t* gin) {
    at::parallel_for(0, nb * p.C, 1, [&](int64_t b, int64_t e) {
      for (int64_t nc = b; nc < e; ++nc) {
        const int64_t n = nc / p.C, c = nc % p.C;
        acc_t* plane = gin + ((n0 + n) * p.C + c) * p.H * p.W;
        const acc_t* gr = gX + nc * p.K * p.L;
        for (int64_t t = 0; t < p.K; ++t) {
          const int64_t ti = t / p.kw, tj = t % p.kw;
          const int64_t ib0 = ((n * p.Gi + c / p.Cig) * p.K + t) * p.L * 4;
          for (int64_t ho = 0; ho < p.Ho; ++ho) {
            const acc_t* grow = gr + t * p.L + ho * p.Wo;
            if (p.has_off) {
              const int32_t* ii = iidx + ib0 + ho * p.Wo * 4;
              const acc_t* ww = iw + ib0 + ho * p.Wo * 4;
              for (int64_t wo = 0; wo < p.Wo; ++wo) {
                const acc_t v = grow[wo];
                plane[ii[4 * wo + 0]] += ww[4 * wo + 0] * v;
                plane[ii[4 * wo + 1]] += ww[4 * wo + 1] * v;
                plane[ii[4 * wo + 2]] += ww[4 * wo + 2] * v;
                plane[ii[4 * wo + 3]] += ww[4 * wo + 3] * v;
              }
            } else {
              const int64_t y = ho * p.sth - p.ph + ti * p.dh;
              if (y < 0 || y >= p.H) continue;
              acc_t* prow = plane + y * p.W;
              for (int64_t wo = 0; wo < p.Wo; ++wo) {
                const int64_t xx = wo * p.stw - p.pw + tj * p.dw;
                if (xx >= 0 && xx < p.W) prow[xx] += grow[wo];
              }
            }
          }
        }
      }
    });
  }
};

at::Tensor opt(const c10::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->contiguous() : at::Tensor();
}

bool reduced(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

at::Tensor up(const at::Tensor& t) {
  return t.defined() ? t.to(at::kFloat) : t;
}

at::Tensor forward_cpu(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& kernel_offset,
                       const c10::optional<at::Tensor>& offset, const c10::optional<at::Tensor>& mask,
                       const c10::optional<at::Tensor>& bias, int64_t kh, int64_t kw, int64_t sth, int64_t stw,
                       int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t groups) {
  TORCH_CHECK(input.device().is_cpu(), "dk_ops: CPU kernel called with a ", input.device(), " tensor");
  const Params p = detail::make_params(input, weight, kernel_offset, offset, mask, kh, kw, sth, stw, ph, pw, dh, dw,
                                       groups);
  at::Tensor x = input.contiguous(), w = weight.contiguous();
  at::Tensor dk = opt(kernel_offset), off = opt(offset), m = opt(mask), b = opt(bias);
  if (reduced(x)) {
    return detail::forward_impl<float, CpuExec>(up(x), up(w), up(dk), up(off), up(m), up(b), p).to(x.scalar_type());
  }
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "deform_kernel_conv2d_cpu", [&] {
    out = detail::forward_impl<scalar_t, CpuExec>(x, w, dk, off, m, b, p);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight,
    const c10::optional<at::Tensor>& kernel_offset, const c10::optional<at::Tensor>& offset,
    const c10::optional<at::Tensor>& mask, int64_t kh, int64_t kw, int64_t sth, int64_t stw, int64_t ph, int64_t pw,
    int64_t dh, int64_t dw, int64_t groups, std::array<bool, 6> output_mask) {
  TORCH_CHECK(input.device().is_cpu(), "dk_ops: CPU kernel called with a ", input.device(), " tensor");
  const Params p = detail::make_params(input, weight, kernel_offset, offset, mask, kh, kw, sth, stw, ph, pw, dh, dw,
                                       groups);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == p.N && grad.size(1) == p.Co && grad.size(2) == p.Ho &&
                  grad.size(3) == p.Wo,
              "dk_ops: grad has shape ", grad.sizes(), ", expected (", p.N, ", ", p.Co, ", ", p.Ho, ", ", p.Wo, ")");
  at::Tensor g = grad.contiguous(), x = input.contiguous(), w = weight.contiguous();
  at::Tensor dk = opt(kernel_offset), off = opt(offset), m = opt(mask);
  if (reduced(x)) {
    auto r = detail::backward_impl<float, CpuExec>(up(g), up(x), up(w), up(dk), up(off), up(m), p, output_mask);
    const auto dt = x.scalar_type();
    return std::make_tuple(std::get<0>(r).to(dt), std::get<1>(r).to(dt), std::get<2>(r).to(dt),
                           std::get<3>(r).to(dt), std::get<4>(r).to(dt), std::get<5>(r).to(dt));
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "deform_kernel_conv2d_backward_cpu", [&] {
    out = detail::backward_impl<scalar_t, CpuExec>(g.to(x.scalar_type()), x, w, dk, off, m, p, output_mask);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dk_ops, CPU, m) {
  m.impl("deform_kernel_conv2d", &forward_cpu);
  m.impl("_deform_kernel_conv2d_backward", &backward_cpu);
}

}  // namespace dk_ops
