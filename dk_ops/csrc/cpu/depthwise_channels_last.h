// Depthwise deform_kernel_conv2d on channels-last CPU tensors (the layout a
// channels-last model hands the op): groups == in_channels == out_channels, float32
// or float64, any kernel offsets (none, global, local), image offsets, mask and
// offset groups. Every (sample, position, tap) computes its bilinear corners once
// and then runs contiguous loops over channels, which the compiler vectorises; the
// NCHW kernels instead gather per channel through index arrays.
//
// Ownership (no atomics, bitwise reproducible for any thread count): the forward
// parallelises over (sample, position); the backward over samples, each owning its
// input-gradient plane, its offset/mask gradients and a weight-gradient partial that
// is summed over samples in a fixed order.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <numeric>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../deform_kernel_conv2d_impl.h"

namespace dk_ops {
namespace detail {

// A read-only 4-D view by strides; a 2-D tensor (global kernel offsets) ignores h, w.
template <typename T>
struct View4 {
  T* d = nullptr;
  int64_t sn = 0, sc = 0, sh = 0, sw = 0;
  View4() = default;
  explicit View4(const at::Tensor& t) {
    if (!t.defined()) return;
    d = t.data_ptr<std::remove_const_t<T>>();
    sn = t.stride(0);
    sc = t.stride(1);
    if (t.dim() == 4) {
      sh = t.stride(2);
      sw = t.stride(3);
    }
  }
  T& operator()(int64_t n, int64_t c, int64_t h, int64_t w) const { return d[n * sn + c * sc + h * sh + w * sw]; }
};

// Corners of one (sample, position, tap): kernel corners per kernel-offset group, image
// corners per image-offset group (with derivatives when asked), mask value per mask group.
template <typename T>
struct TapCorners {
  std::vector<int32_t> ki, ii;
  std::vector<T> kw, ky, kx, iw, iy, ix, m;
  explicit TapCorners(const Params& p)
      : ki(4 * p.Gk), ii(4 * p.Gi), kw(4 * p.Gk), ky(4 * p.Gk), kx(4 * p.Gk), iw(4 * p.Gi), iy(4 * p.Gi),
        ix(4 * p.Gi), m(p.Gm, T(1)) {}

  void compute(const Params& p, const View4<const T>& dk, const View4<const T>& off, const View4<const T>& mask,
               int64_t n, int64_t t, int64_t ho, int64_t wo, bool derivs) {
    const int64_t ti = t / p.kw, tj = t % p.kw;
    for (int64_t gk = 0; gk < p.Gk; ++gk) {
      T u = T((p.Sh - p.kh) * 0.5) + T(ti), v = T((p.Sw - p.kw) * 0.5) + T(tj);
      if (p.has_dk) {
        u += dk(n, 2 * (gk * p.K + t), ho, wo);
        v += dk(n, 2 * (gk * p.K + t) + 1, ho, wo);
      }
      bilinear<T>(u, v, p.Sh, p.Sw, &ki[4 * gk], &kw[4 * gk], derivs ? &ky[4 * gk] : nullptr,
                  derivs ? &kx[4 * gk] : nullptr);
    }
    if (p.has_off) {
      for (int64_t gi = 0; gi < p.Gi; ++gi) {
        const T py = T(ho * p.sth - p.ph + ti * p.dh) + off(n, 2 * (gi * p.K + t), ho, wo);
        const T px = T(wo * p.stw - p.pw + tj * p.dw) + off(n, 2 * (gi * p.K + t) + 1, ho, wo);
        bilinear<T>(py, px, p.H, p.W, &ii[4 * gi], &iw[4 * gi], derivs ? &iy[4 * gi] : nullptr,
                    derivs ? &ix[4 * gi] : nullptr);
      }
    }
    if (p.has_mask) {
      for (int64_t gm = 0; gm < p.Gm; ++gm) m[gm] = mask(n, gm * p.K + t, ho, wo);
    }
  }
};

// Channels over which the kernel-offset, image-offset and mask groups are all constant.
inline int64_t channel_segment(const Params& p) { return std::gcd(std::gcd(p.Cok, p.Cig), p.Cmg); }

// y (N, C, Ho, Wo), channels-last. x channels-last; w (C, 1, Sh, Sw); the others any strides.
template <typename T>
at::Tensor dw_channels_last_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& dk,
                                    const at::Tensor& off, const at::Tensor& mask, const at::Tensor& bias,
                                    const Params& p) {
  at::Tensor y = at::empty({p.N, p.C, p.Ho, p.Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (p.N == 0) return y;
  const at::Tensor wt = w.reshape({p.C, p.S}).t().contiguous();  // (S, C): a scope cell's weights are contiguous
  const at::Tensor b = bias.defined() ? bias.contiguous() : bias;
  const T* xp = x.data_ptr<T>();
  const T* wtp = wt.data_ptr<T>();
  const T* bp = b.defined() ? b.data_ptr<T>() : nullptr;
  T* yp = y.data_ptr<T>();
  const View4<const T> dkv(dk), offv(off), mv(mask);
  const int64_t C = p.C, seg = channel_segment(p);
  DK_PASS("dw_channels_last_forward");
  at::parallel_for(0, p.N * p.L, std::max<int64_t>(1, 4096 / (p.K * C)), [&](int64_t begin, int64_t end) {
    TapCorners<T> tc(p);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / p.L, l = i % p.L, ho = l / p.Wo, wo = l % p.Wo;
      T* yr = yp + i * C;
      for (int64_t c = 0; c < C; ++c) yr[c] = bp != nullptr ? bp[c] : T(0);
      const T* xn = xp + n * p.H * p.W * C;
      for (int64_t t = 0; t < p.K; ++t) {
        int64_t r = 0;
        if (!p.has_off) {
          r = rigid_index(p, t / p.kw, t % p.kw, ho, wo);
          if (r < 0) continue;  // zero padding
        }
        tc.compute(p, dkv, offv, mv, n, t, ho, wo, false);
        for (int64_t c0 = 0; c0 < C; c0 += seg) {
          const int64_t gk = c0 / p.Cok, gi = c0 / p.Cig;
          const T mk = tc.m[c0 / p.Cmg];
          const int32_t* kq = &tc.ki[4 * gk];
          const T k0 = tc.kw[4 * gk] * mk, k1 = tc.kw[4 * gk + 1] * mk, k2 = tc.kw[4 * gk + 2] * mk,
                  k3 = tc.kw[4 * gk + 3] * mk;
          const T *w0 = wtp + kq[0] * C, *w1 = wtp + kq[1] * C, *w2 = wtp + kq[2] * C, *w3 = wtp + kq[3] * C;
          if (p.has_off) {
            const int32_t* iq = &tc.ii[4 * gi];
            const T a0 = tc.iw[4 * gi], a1 = tc.iw[4 * gi + 1], a2 = tc.iw[4 * gi + 2], a3 = tc.iw[4 * gi + 3];
            const T *x0 = xn + iq[0] * C, *x1 = xn + iq[1] * C, *x2 = xn + iq[2] * C, *x3 = xn + iq[3] * C;
#pragma omp simd
            for (int64_t c = c0; c < c0 + seg; ++c) {
              yr[c] += (k0 * w0[c] + k1 * w1[c] + k2 * w2[c] + k3 * w3[c]) *
                       (a0 * x0[c] + a1 * x1[c] + a2 * x2[c] + a3 * x3[c]);
            }
          } else {
            const T* xr = xn + r * C;
#pragma omp simd
            for (int64_t c = c0; c < c0 + seg; ++c) {
              yr[c] += (k0 * w0[c] + k1 * w1[c] + k2 * w2[c] + k3 * w3[c]) * xr[c];
            }
          }
        }
      }
    }
  });
  return y;
}

// Gradients of (input, weight, kernel_offset, offset, mask, bias); g is channels-last.
// The input gradient is channels-last, the offset and mask gradients in their arguments'
// formats; an entry not needed is an empty tensor, as backward_impl returns it.
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_channels_last_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                                                    const at::Tensor& dk, const at::Tensor& off,
                                                    const at::Tensor& mask, const Params& p,
                                                    std::array<bool, 6> need) {
  const bool need_in = need[0], need_w = need[1];
  const bool need_dk = need[2] && p.has_dk, need_off = need[3] && p.has_off, need_mask = need[4] && p.has_mask;
  std::array<at::Tensor, 6> out;
  const auto cl = x.options().memory_format(at::MemoryFormat::ChannelsLast);
  if (need_in) out[0] = at::empty({p.N, p.C, p.H, p.W}, cl).zero_();  // at::zeros drops the memory format
  if (need_dk) out[2] = at::zeros_like(dk, dk.options(), format_of(dk));
  if (need_off) out[3] = at::zeros_like(off, off.options(), format_of(off));
  if (need_mask) out[4] = at::zeros_like(mask, mask.options(), format_of(mask));
  if (need[5]) out[5] = g.sum(at::IntArrayRef{0, 2, 3});
  at::Tensor gw_part = need_w ? at::zeros({p.N, p.S, p.C}, x.options()) : at::Tensor();
  if (p.N > 0 && (need_in || need_w || need_dk || need_off || need_mask)) {
    const at::Tensor wt = w.reshape({p.C, p.S}).t().contiguous();
    const T* xp = x.data_ptr<T>();
    const T* wtp = wt.data_ptr<T>();
    const T* gp = g.data_ptr<T>();
    T* ginp = need_in ? out[0].data_ptr<T>() : nullptr;
    T* gwp = need_w ? gw_part.data_ptr<T>() : nullptr;
    const View4<const T> dkv(dk), offv(off), mv(mask);
    const View4<T> gdk(out[2]), goff(out[3]), gmask(out[4]);
    const int64_t C = p.C, HW = p.H * p.W, seg = channel_segment(p);
    const bool derivs = need_dk || need_off;
    DK_PASS("dw_channels_last_backward");
    at::parallel_for(0, p.N, 1, [&](int64_t begin, int64_t end) {
      TapCorners<T> tc(p);
      std::vector<T> gpb(seg), gxb(seg);
      for (int64_t n = begin; n < end; ++n) {
        const T* xn = xp + n * HW * C;
        T* gin = ginp != nullptr ? ginp + n * HW * C : nullptr;
        T* gwn = gwp != nullptr ? gwp + n * p.S * C : nullptr;
        for (int64_t l = 0; l < p.L; ++l) {
          const int64_t ho = l / p.Wo, wo = l % p.Wo;
          const T* gyr = gp + (n * p.L + l) * C;
          for (int64_t t = 0; t < p.K; ++t) {
            int64_t r = 0;
            if (!p.has_off) {
              r = rigid_index(p, t / p.kw, t % p.kw, ho, wo);
              if (r < 0) continue;  // zero padding: no gradient flows through this tap
            }
            tc.compute(p, dkv, offv, mv, n, t, ho, wo, derivs);
            for (int64_t c0 = 0; c0 < C; c0 += seg) {
              const int64_t gk = c0 / p.Cok, gi = c0 / p.Cig, gm = c0 / p.Cmg;
              const T mk = tc.m[gm];
              const int32_t* kq = &tc.ki[4 * gk];
              const T* kw = &tc.kw[4 * gk];
              const T* ky = &tc.ky[4 * gk];
              const T* kx = &tc.kx[4 * gk];
              const T *w0 = wtp + kq[0] * C, *w1 = wtp + kq[1] * C, *w2 = wtp + kq[2] * C, *w3 = wtp + kq[3] * C;
              T duk = 0, dvk = 0, dui = 0, dvi = 0, gmv = 0;
              if (p.has_off) {
                const int32_t* iq = &tc.ii[4 * gi];
                const T* a = &tc.iw[4 * gi];
                const T* ay = &tc.iy[4 * gi];
                const T* ax = &tc.ix[4 * gi];
                const T *x0 = xn + iq[0] * C, *x1 = xn + iq[1] * C, *x2 = xn + iq[2] * C, *x3 = xn + iq[3] * C;
#pragma omp simd reduction(+ : duk, dvk, dui, dvi, gmv)
                for (int64_t c = c0; c < c0 + seg; ++c) {
                  const T v0 = x0[c], v1 = x1[c], v2 = x2[c], v3 = x3[c];
                  const T q0 = w0[c], q1 = w1[c], q2 = w2[c], q3 = w3[c];
                  const T xs = a[0] * v0 + a[1] * v1 + a[2] * v2 + a[3] * v3;
                  const T gy = gyr[c];
                  const T gpv = gy * xs * mk;  // d loss / d (sampled kernel value)
                  const T gx = gy * (kw[0] * q0 + kw[1] * q1 + kw[2] * q2 + kw[3] * q3);  // d / d (masked sample)
                  duk += gpv * (ky[0] * q0 + ky[1] * q1 + ky[2] * q2 + ky[3] * q3);
                  dvk += gpv * (kx[0] * q0 + kx[1] * q1 + kx[2] * q2 + kx[3] * q3);
                  gmv += gx * xs;
                  const T gxs = gx * mk;  // d / d (sample)
                  dui += gxs * (ay[0] * v0 + ay[1] * v1 + ay[2] * v2 + ay[3] * v3);
                  dvi += gxs * (ax[0] * v0 + ax[1] * v1 + ax[2] * v2 + ax[3] * v3);
                  gpb[c - c0] = gpv;
                  gxb[c - c0] = gxs;
                }
                if (gin != nullptr) {
                  for (int q = 0; q < 4; ++q) {
                    if (a[q] == T(0)) continue;  // outside the image (corner index 0 is a placeholder)
                    T* gq = gin + int64_t(iq[q]) * C + c0;
                    const T aq = a[q];
#pragma omp simd
                    for (int64_t c = 0; c < seg; ++c) gq[c] += aq * gxb[c];
                  }
                }
              } else {
                const T* xr = xn + r * C;
#pragma omp simd reduction(+ : duk, dvk, gmv)
                for (int64_t c = c0; c < c0 + seg; ++c) {
                  const T q0 = w0[c], q1 = w1[c], q2 = w2[c], q3 = w3[c];
                  const T xs = xr[c];
                  const T gy = gyr[c];
                  const T gpv = gy * xs * mk;
                  const T gx = gy * (kw[0] * q0 + kw[1] * q1 + kw[2] * q2 + kw[3] * q3);
                  duk += gpv * (ky[0] * q0 + ky[1] * q1 + ky[2] * q2 + ky[3] * q3);
                  dvk += gpv * (kx[0] * q0 + kx[1] * q1 + kx[2] * q2 + kx[3] * q3);
                  gmv += gx * xs;
                  gpb[c - c0] = gpv;
                  gxb[c - c0] = gx * mk;
                }
                if (gin != nullptr) {
                  T* gq = gin + r * C + c0;
#pragma omp simd
                  for (int64_t c = 0; c < seg; ++c) gq[c] += gxb[c];
                }
              }
              if (gwn != nullptr) {
                for (int q = 0; q < 4; ++q) {
                  if (kw[q] == T(0)) continue;  // outside the scope
                  T* gq = gwn + int64_t(kq[q]) * C + c0;
                  const T kq_w = kw[q];
#pragma omp simd
                  for (int64_t c = 0; c < seg; ++c) gq[c] += kq_w * gpb[c];
                }
              }
              if (need_dk) {
                gdk(n, 2 * (gk * p.K + t), ho, wo) += duk;
                gdk(n, 2 * (gk * p.K + t) + 1, ho, wo) += dvk;
              }
              if (need_off) {
                goff(n, 2 * (gi * p.K + t), ho, wo) += dui;
                goff(n, 2 * (gi * p.K + t) + 1, ho, wo) += dvi;
              }
              if (need_mask) gmask(n, gm * p.K + t, ho, wo) += gmv;
            }
          }
        }
      }
    });
    if (need_w) {
      // gW[c, s] = sum over samples (in order) of the partials.
      DK_PASS("dw_channels_last_gw");
      at::Tensor gw = at::empty({p.C, p.S}, x.options());
      T* gwo = gw.data_ptr<T>();
      at::parallel_for(0, p.S * C, 1024, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          T s = 0;
          for (int64_t n = 0; n < p.N; ++n) s += gwp[n * p.S * C + i];
          gwo[(i % C) * p.S + i / C] = s;
        }
      });
      out[1] = gw.view({p.C, 1, p.Sh, p.Sw});
    }
  } else if (need_w) {
    out[1] = at::zeros({p.C, 1, p.Sh, p.Sw}, x.options());
  }
  for (auto& t : out) {
    if (!t.defined()) t = at::empty({0}, x.options());
  }
  return std::make_tuple(out[0], out[1], out[2], out[3], out[4], out[5]);
}

}  // namespace detail
}  // namespace dk_ops
