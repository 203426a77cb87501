// CPU kernels of dk_ops::deform_kernel_conv2d: the shared algorithms of
// ../deform_kernel_conv2d_impl.h run with at::parallel_for. float32 and float64
// natively; float16/bfloat16 are computed in float32 (as the reference does).
// Every reduction has one owner per output element, so results (the weight
// gradient included) are bitwise reproducible for a given thread count.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <vector>
#include <torch/library.h>

#include "../deform_kernel_conv2d_impl.h"
#include "depthwise_channels_last.h"

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

  // DK_OPS_CPU_GENERIC=1 runs the device-agnostic passes that CUDA runs (tests use it).
  static bool fused_depthwise_backward() {
    const char* v = std::getenv("DK_OPS_CPU_GENERIC");
    return v == nullptr || v[0] == '\0' || v[0] == '0';
  }
  static bool direct_depthwise_global() { return fused_depthwise_backward(); }

  // Depthwise backward with local kernel offsets in one pass. Tasks own (sample,
  // block of kBlock positions); for each input channel the sampled input is formed
  // once, then every output channel of its group adds to the column gradient, the
  // kernel-offset gradient (local accumulators) and its own slice of the task's
  // weight-gradient partial. Partials are summed over tasks in a fixed order, so
  // the result is deterministic.
  template <typename scalar_t, typename acc_t>
  static void dw_local_backward(const Params& p, int64_t n0, int64_t nb, const scalar_t* x, const scalar_t* w,
                                const scalar_t* mask, const scalar_t* dk, const int32_t* iidx, const acc_t* iw,
                                const acc_t* gy, bool need_w, bool need_dk, bool need_mask, acc_t* gw, acc_t* gdk,
                                acc_t* gX, acc_t* gmask) {
    constexpr int64_t B = kBlock;
    const int64_t nblk = (p.L + B - 1) / B;
    const int64_t tasks = nb * nblk;
    const int64_t CoS = p.Co * p.S;
    std::vector<acc_t> gw_part(need_w ? tasks * CoS : 0);
    const int64_t KB = p.K * B;
    at::parallel_for(0, tasks, 1, [&](int64_t tb, int64_t te) {
      std::vector<int32_t> ci(p.Gk * KB * 4);
      std::vector<acc_t> cw(p.Gk * KB * 4), cy(p.Gk * KB * 4), cx(p.Gk * KB * 4);
      std::vector<acc_t> gu(p.Gk * KB), gv(p.Gk * KB), gm(p.Gm * KB);
      std::vector<acc_t> xs(KB), xm(KB), gxc(KB);
      std::vector<int64_t> hoj(B), woj(B);
      for (int64_t task = tb; task < te; ++task) {
        const int64_t n = task / nblk;
        const int64_t j0 = (task % nblk) * B;
        const int64_t nj = std::min(B, p.L - j0);
        for (int64_t j = 0; j < nj; ++j) {
          hoj[j] = (j0 + j) / p.Wo;
          woj[j] = (j0 + j) % p.Wo;
        }
        for (int64_t gk = 0; gk < p.Gk; ++gk) {
          for (int64_t t = 0; t < p.K; ++t) {
            const int64_t ti = t / p.kw, tj = t % p.kw;
            for (int64_t j = 0; j < nj; ++j) {
              const int64_t e = ((gk * p.K + t) * B + j) * 4;
              detail::kernel_bilinear<acc_t>(p, dk, n0 + n, gk, t, ti, tj, j0 + j, &ci[e], &cw[e], &cy[e], &cx[e]);
            }
          }
        }
        std::fill(gu.begin(), gu.end(), acc_t(0));
        std::fill(gv.begin(), gv.end(), acc_t(0));
        std::fill(gm.begin(), gm.end(), acc_t(0));
        acc_t* gwt = need_w ? gw_part.data() + task * CoS : nullptr;
        if (gwt != nullptr) std::fill(gwt, gwt + CoS, acc_t(0));
        for (int64_t c = 0; c < p.C; ++c) {
          const scalar_t* plane = x + ((n0 + n) * p.C + c) * p.H * p.W;
          const int64_t gi = c / p.Cig, gmc = c / p.Cmg;
          for (int64_t t = 0; t < p.K; ++t) {
            const int64_t ti = t / p.kw, tj = t % p.kw;
            const scalar_t* mrow = p.has_mask ? mask + (((n0 + n) * p.Gm + gmc) * p.K + t) * p.L + j0 : nullptr;
            const int64_t ib0 = (((n * p.Gi + gi) * p.K + t) * p.L + j0) * 4;
            for (int64_t j = 0; j < nj; ++j) {
              acc_t v;
              if (p.has_off) {
                const int64_t ib = ib0 + 4 * j;
                v = iw[ib] * acc_t(plane[iidx[ib]]) + iw[ib + 1] * acc_t(plane[iidx[ib + 1]]) +
                    iw[ib + 2] * acc_t(plane[iidx[ib + 2]]) + iw[ib + 3] * acc_t(plane[iidx[ib + 3]]);
              } else {
                const int64_t r = detail::rigid_index(p, ti, tj, hoj[j], woj[j]);
                v = r >= 0 ? acc_t(plane[r]) : acc_t(0);
              }
              xs[t * B + j] = v;
              xm[t * B + j] = p.has_mask ? v * acc_t(mrow[j]) : v;
              gxc[t * B + j] = acc_t(0);
            }
          }
          for (int64_t o = c * p.Cog; o < (c + 1) * p.Cog; ++o) {
            const int64_t gk = o / p.Cok;
            const scalar_t* wo = w + o * p.S;
            const acc_t* gyr = gy + (n * p.Co + o) * p.L + j0;
            acc_t* gwo = gwt != nullptr ? gwt + o * p.S : nullptr;
            for (int64_t t = 0; t < p.K; ++t) {
              const int64_t e0 = (gk * p.K + t) * B;
              for (int64_t j = 0; j < nj; ++j) {
                const int64_t e = (e0 + j) * 4;
                const acc_t w0 = acc_t(wo[ci[e]]), w1 = acc_t(wo[ci[e + 1]]), w2 = acc_t(wo[ci[e + 2]]),
                            w3 = acc_t(wo[ci[e + 3]]);
                const acc_t gyv = gyr[j];
                gxc[t * B + j] += (cw[e] * w0 + cw[e + 1] * w1 + cw[e + 2] * w2 + cw[e + 3] * w3) * gyv;
                const acc_t gp = gyv * xm[t * B + j];
                if (gwo != nullptr) {
                  gwo[ci[e]] += cw[e] * gp;
                  gwo[ci[e + 1]] += cw[e + 1] * gp;
                  gwo[ci[e + 2]] += cw[e + 2] * gp;
                  gwo[ci[e + 3]] += cw[e + 3] * gp;
                }
                if (need_dk) {
                  gu[e0 + j] += gp * (cy[e] * w0 + cy[e + 1] * w1 + cy[e + 2] * w2 + cy[e + 3] * w3);
                  gv[e0 + j] += gp * (cx[e] * w0 + cx[e + 1] * w1 + cx[e + 2] * w2 + cx[e + 3] * w3);
                }
              }
            }
          }
          for (int64_t t = 0; t < p.K; ++t) {
            const scalar_t* mrow = p.has_mask ? mask + (((n0 + n) * p.Gm + gmc) * p.K + t) * p.L + j0 : nullptr;
            acc_t* gxr = gX != nullptr ? gX + ((n * p.C + c) * p.K + t) * p.L + j0 : nullptr;
            for (int64_t j = 0; j < nj; ++j) {
              const acc_t g = gxc[t * B + j];
              if (need_mask) gm[(gmc * p.K + t) * B + j] += g * xs[t * B + j];
              if (gxr != nullptr) gxr[j] = p.has_mask ? g * acc_t(mrow[j]) : g;
            }
          }
        }
        if (need_dk) {
          for (int64_t gk = 0; gk < p.Gk; ++gk) {
            for (int64_t t = 0; t < p.K; ++t) {
              acc_t* out = gdk + ((n0 + n) * 2 * p.Gk * p.K + 2 * (gk * p.K + t)) * p.L + j0;
              for (int64_t j = 0; j < nj; ++j) {
                out[j] = gu[(gk * p.K + t) * B + j];
                out[p.L + j] = gv[(gk * p.K + t) * B + j];
              }
            }
          }
        }
        if (need_mask) {
          for (int64_t g = 0; g < p.Gm; ++g) {
            for (int64_t t = 0; t < p.K; ++t) {
              acc_t* out = gmask + (((n0 + n) * p.Gm + g) * p.K + t) * p.L + j0;
              for (int64_t j = 0; j < nj; ++j) out[j] = gm[(g * p.K + t) * B + j];
            }
          }
        }
      }
    });
    if (need_w) {
      at::parallel_for(0, CoS, 256, [&](int64_t b, int64_t e) {
        for (int64_t task = 0; task < tasks; ++task) {
          const acc_t* part = gw_part.data() + task * CoS;
          for (int64_t i = b; i < e; ++i) gw[i] += part[i];
        }
      });
    }
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

at::Tensor raw(const c10::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? *t : at::Tensor();
}

// Depthwise float32/float64 layers (groups == in_channels == out_channels) run the
// channels-last kernels (depthwise_channels_last.h); an NCHW input is converted first (a
// copy, much cheaper than the per-channel gathers of the NCHW kernels: about 7x on the
// benchmark's depthwise shapes) and the outputs converted back. DK_OPS_CPU_GENERIC=1 turns
// them off, like the other CPU-only passes.
bool channels_last_depthwise(const at::Tensor& input, const detail::Params& p) {
  const auto dt = input.scalar_type();
  return p.Cg == 1 && p.Cog == 1 && (dt == at::kFloat || dt == at::kDouble) && CpuExec::fused_depthwise_backward();
}

at::Tensor to_channels_last(const at::Tensor& t) { return t.contiguous(at::MemoryFormat::ChannelsLast); }

at::Tensor forward_cpu(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& kernel_offset,
                       const c10::optional<at::Tensor>& offset, const c10::optional<at::Tensor>& mask,
                       const c10::optional<at::Tensor>& bias, int64_t kh, int64_t kw, int64_t sth, int64_t stw,
                       int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t groups) {
  TORCH_CHECK(input.device().is_cpu(), "dk_ops: CPU kernel called with a ", input.device(), " tensor");
  const Params p = detail::make_params(input, weight, kernel_offset, offset, mask, kh, kw, sth, stw, ph, pw, dh, dw,
                                       groups);
  at::Tensor out;
  if (channels_last_depthwise(input, p)) {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_kernel_conv2d_cpu_cl", [&] {
      out = detail::dw_channels_last_forward<scalar_t>(to_channels_last(input), weight, raw(kernel_offset),
                                                       raw(offset), raw(mask), raw(bias), p);
    });
    return detail::in_format_of(out, input);
  }
  at::Tensor x = input.contiguous(), w = weight.contiguous();
  at::Tensor dk = opt(kernel_offset), off = opt(offset), m = opt(mask), b = opt(bias);
  if (reduced(x)) {
    out = detail::forward_impl<float, CpuExec>(up(x), up(w), up(dk), up(off), up(m), up(b), p).to(x.scalar_type());
  } else {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "deform_kernel_conv2d_cpu", [&] {
      out = detail::forward_impl<scalar_t, CpuExec>(x, w, dk, off, m, b, p);
    });
  }
  return detail::in_format_of(out, input);
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
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  if (channels_last_depthwise(input, p)) {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_kernel_conv2d_backward_cpu_cl", [&] {
      const at::Tensor g = grad.to(input.scalar_type()).contiguous(at::MemoryFormat::ChannelsLast);
      out = detail::dw_channels_last_backward<scalar_t>(g, to_channels_last(input), weight, raw(kernel_offset),
                                                        raw(offset), raw(mask), p, output_mask);
    });
    return detail::grads_in_formats(out, input, weight, kernel_offset, offset, mask);
  }
  at::Tensor g = grad.contiguous(), x = input.contiguous(), w = weight.contiguous();
  at::Tensor dk = opt(kernel_offset), off = opt(offset), m = opt(mask);
  if (reduced(x)) {
    auto r = detail::backward_impl<float, CpuExec>(up(g), up(x), up(w), up(dk), up(off), up(m), p, output_mask);
    const auto dt = x.scalar_type();
    out = std::make_tuple(std::get<0>(r).to(dt), std::get<1>(r).to(dt), std::get<2>(r).to(dt),
                          std::get<3>(r).to(dt), std::get<4>(r).to(dt), std::get<5>(r).to(dt));
  } else {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "deform_kernel_conv2d_backward_cpu", [&] {
      out = detail::backward_impl<scalar_t, CpuExec>(g.to(x.scalar_type()), x, w, dk, off, m, p, output_mask);
    });
  }
  return detail::grads_in_formats(out, input, weight, kernel_offset, offset, mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(dk_ops, CPU, m) {
  m.impl("deform_kernel_conv2d", &forward_cpu);
  m.impl("_deform_kernel_conv2d_backward", &backward_cpu);
}

}  // namespace dk_ops
