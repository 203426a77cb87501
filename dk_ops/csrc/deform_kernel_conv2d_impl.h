// Device-agnostic algorithms of dk_ops::deform_kernel_conv2d (DESIGN.md section 2).
//
// The same element functions run on the CPU (at::parallel_for) and on CUDA (one
// grid-stride kernel per step): an `Exec` policy supplies `for_each(count, grain,
// f)` plus the two steps whose parallel form differs between devices (the
// depthwise weight gradient, a reduction, and the input-gradient scatter).
//
// Sizes: input (N, C, H, W); scope weight (Co, Cg, Sh, Sw), S = Sh*Sw scope cells;
// kernel (kh, kw), K = kh*kw taps; output (N, Co, Ho, Wo), L = Ho*Wo positions.
// Kernel offsets have Gk groups over output channels; image offsets Gi groups and
// the mask Gm groups over input channels (blocked, like torchvision).
//
// Algorithms (all accumulate in acc_t = at::opmath_type<scalar_t>):
//  * bilinear corners of the kernel sampling are computed once per
//    (n, kernel group, tap, position) into `kidx/kw`; those of the image sampling
//    once per (n, image group, tap, position) into `iidx/iw`; never per channel.
//  * the (modulated) input columns X (nb, C, K, L) are sampled per batch chunk.
//  * kernel offsets that do not vary with position (none, or global): the sampled
//    kernel Wk (Nk, Co, Cg, K) is formed once and y = Wk @ X (batched GEMM).
//  * local kernel offsets, depthwise (Cg == 1): a direct kernel,
//    y[o, l] = sum_t X[c, t, l] * sum_q kw[q] * W[o, kidx[q]].
//  * local kernel offsets, general groups: the scattered column
//    Z[c, s, l] = sum_{t, q: kidx = s} kw * X[c, t, l], then y = W (Co x Cg*S) @ Z,
//    one GEMM per (conv group, kernel group) pair.
//  Backward mirrors each step; every accumulation has a single owner per output
//  element (no atomics) except the CUDA input-gradient scatter.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/record_function.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#if defined(__CUDACC__)
#define DK_HD __host__ __device__ __forceinline__
#define DK_LAMBDA [=] __host__ __device__
#else
#define DK_HD inline
#define DK_LAMBDA [=]
#endif

// A named scope in torch.profiler traces (no cost when the profiler is off).
#define DK_PASS(name) RECORD_FUNCTION("dk_ops::" name, std::vector<c10::IValue>())

namespace dk_ops {
namespace detail {

DK_HD float dk_floor(float v) { return floorf(v); }
DK_HD double dk_floor(double v) { return floor(v); }

struct Params {
  int64_t N, C, H, W;           // input
  int64_t Co, Cg, G, Cog;       // output channels, channels per group, groups, outputs per group
  int64_t Sh, Sw, S;            // scope
  int64_t kh, kw, K;            // kernel
  int64_t sth, stw, ph, pw, dh, dw;
  int64_t Ho, Wo, L;
  int64_t Gk, Cok;              // kernel-offset groups, output channels per kernel-offset group
  int64_t Gi, Cig;              // image-offset groups, input channels per group
  int64_t Gm, Cmg;              // mask groups, input channels per group
  int64_t Nk;                   // kernel-offset batch: N (given) or 1 (none)
  int64_t P;                    // kernel-offset positions: L (local) or 1 (global / none)
  bool has_dk, has_off, has_mask;
};

// Four-corner bilinear sampling of a height x width plane at (py, px): flat
// corner index (0 when outside), weight (0 when outside) and, optionally, the
// weight's derivative along y and x. Corners are (y0,x0), (y0,x0+1), (y0+1,x0),
// (y0+1,x0+1), as in dk_ops.reference.bilinear_corners.
template <typename A>
DK_HD void bilinear(A py, A px, int64_t height, int64_t width, int32_t* idx, A* w, A* dwy, A* dwx) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    idx[q] = 0;
    w[q] = A(0);
    if (dwy != nullptr) {
      dwy[q] = A(0);
      dwx[q] = A(0);
    }
  }
  // Entirely outside (also keeps the integer conversion below in range).
  if (!(py > A(-2) && py < A(height + 1) && px > A(-2) && px < A(width + 1))) {
    return;
  }
  const A y0f = dk_floor(py);
  const A x0f = dk_floor(px);
  const int64_t y0 = static_cast<int64_t>(y0f);
  const int64_t x0 = static_cast<int64_t>(x0f);
  const A ly = py - y0f, lx = px - x0f;
  const A hy = A(1) - ly, hx = A(1) - lx;
  const A cw[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
  const A cy[4] = {-hx, -lx, hx, lx};
  const A cx[4] = {-hy, hy, -ly, ly};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int64_t yy = y0 + (q >> 1);
    const int64_t xx = x0 + (q & 1);
    if (yy >= 0 && yy < height && xx >= 0 && xx < width) {
      idx[q] = static_cast<int32_t>(yy * width + xx);
      w[q] = cw[q];
      if (dwy != nullptr) {
        dwy[q] = cy[q];
        dwx[q] = cx[q];
      }
    }
  }
}

// Kernel sampling point of tap t = (ti, tj) for kernel group gk at position pp of sample nk.
template <typename A, typename T>
DK_HD void kernel_bilinear(const Params& p, const T* dk, int64_t nk, int64_t gk, int64_t t, int64_t ti, int64_t tj,
                           int64_t pp, int32_t* idx, A* w, A* dwy, A* dwx) {
  A u = A((p.Sh - p.kh) * 0.5) + A(ti);
  A v = A((p.Sw - p.kw) * 0.5) + A(tj);
  if (p.has_dk) {
    const int64_t base = (nk * 2 * p.Gk * p.K + 2 * (gk * p.K + t)) * p.P + pp;
    u = u + A(dk[base]);
    v = v + A(dk[base + p.P]);
  }
  bilinear(u, v, p.Sh, p.Sw, idx, w, dwy, dwx);
}

// Image sampling point of tap t = (ti, tj) for image group gi at output position (ho, wo) of sample n.
template <typename A, typename T>
DK_HD void image_bilinear(const Params& p, const T* off, int64_t n, int64_t gi, int64_t t, int64_t ti, int64_t tj,
                          int64_t ho, int64_t wo, int32_t* idx, A* w, A* dwy, A* dwx) {
  A py = A(ho * p.sth - p.ph + ti * p.dh);
  A px = A(wo * p.stw - p.pw + tj * p.dw);
  if (p.has_off) {
    const int64_t base = (n * 2 * p.Gi * p.K + 2 * (gi * p.K + t)) * p.L + ho * p.Wo + wo;
    py = py + A(off[base]);
    px = px + A(off[base + p.L]);
  }
  bilinear(py, px, p.H, p.W, idx, w, dwy, dwx);
}

// Rigid (offset-free) sampling position of tap (ti, tj) at (ho, wo): flat index, or -1 in the padding.
DK_HD int64_t rigid_index(const Params& p, int64_t ti, int64_t tj, int64_t ho, int64_t wo) {
  const int64_t y = ho * p.sth - p.ph + ti * p.dh;
  const int64_t x = wo * p.stw - p.pw + tj * p.dw;
  return (y >= 0 && y < p.H && x >= 0 && x < p.W) ? y * p.W + x : -1;
}

// Index (x4) of the kernel corners of (nk, gk, t, position l).
DK_HD int64_t kcorner_base(const Params& p, int64_t nk, int64_t gk, int64_t t, int64_t l) {
  return (((nk * p.Gk + gk) * p.K + t) * p.P + (p.P == 1 ? 0 : l)) * 4;
}

inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, work_per_item));
}

struct Pair {
  int64_t g, gk, o_lo, o_hi;
};

// (conv group, kernel-offset group) pairs that share output channels.
inline std::vector<Pair> group_pairs(const Params& p) {
  std::vector<Pair> pairs;
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t lo = g * p.Cog, hi = (g + 1) * p.Cog;
    for (int64_t gk = lo / p.Cok; gk <= (hi - 1) / p.Cok; ++gk) {
      pairs.push_back({g, gk, std::max(lo, gk * p.Cok), std::min(hi, (gk + 1) * p.Cok)});
    }
  }
  return pairs;
}

inline Params make_params(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& dk,
                          const c10::optional<at::Tensor>& off, const c10::optional<at::Tensor>& mask, int64_t kh,
                          int64_t kw, int64_t sth, int64_t stw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                          int64_t groups) {
  TORCH_CHECK(input.dim() == 4, "dk_ops: input must be 4-D, got ", input.sizes());
  TORCH_CHECK(weight.dim() == 4, "dk_ops: weight must be 4-D, got ", weight.sizes());
  TORCH_CHECK(kh >= 1 && kw >= 1 && sth >= 1 && stw >= 1 && dh >= 1 && dw >= 1 && ph >= 0 && pw >= 0 && groups >= 1,
              "dk_ops: invalid kernel_size/stride/padding/dilation/groups");
  Params p{};
  p.N = input.size(0);
  p.C = input.size(1);
  p.H = input.size(2);
  p.W = input.size(3);
  p.Co = weight.size(0);
  p.Cg = weight.size(1);
  p.Sh = weight.size(2);
  p.Sw = weight.size(3);
  p.S = p.Sh * p.Sw;
  p.G = groups;
  TORCH_CHECK(p.C % groups == 0 && p.Co % groups == 0 && p.Cg == p.C / groups,
              "dk_ops: weight ", weight.sizes(), " does not match input ", input.sizes(), " with groups=", groups);
  p.Cog = p.Co / groups;
  p.kh = kh;
  p.kw = kw;
  p.K = kh * kw;
  TORCH_CHECK(kh <= p.Sh && kw <= p.Sw, "dk_ops: kernel_size exceeds the scope size");
  p.sth = sth;
  p.stw = stw;
  p.ph = ph;
  p.pw = pw;
  p.dh = dh;
  p.dw = dw;
  p.Ho = (p.H + 2 * ph - dh * (kh - 1) - 1) / sth + 1;
  p.Wo = (p.W + 2 * pw - dw * (kw - 1) - 1) / stw + 1;
  TORCH_CHECK(p.Ho >= 1 && p.Wo >= 1, "dk_ops: input too small for the kernel");
  p.L = p.Ho * p.Wo;
  TORCH_CHECK(p.H * p.W < (int64_t(1) << 31) && p.S < (int64_t(1) << 31),
              "dk_ops: one input plane must have fewer than 2^31 elements");
  p.has_dk = dk.has_value() && dk->defined();
  p.has_off = off.has_value() && off->defined();
  p.has_mask = mask.has_value() && mask->defined();
  p.Gk = 1;
  p.Nk = 1;
  p.P = 1;
  if (p.has_dk) {
    TORCH_CHECK(dk->dim() == 2 || dk->dim() == 4, "dk_ops: kernel_offset must be 2-D or 4-D");
    TORCH_CHECK(dk->size(0) == p.N && dk->size(1) % (2 * p.K) == 0, "dk_ops: bad kernel_offset shape ", dk->sizes());
    p.Gk = dk->size(1) / (2 * p.K);
    p.Nk = p.N;
    if (dk->dim() == 4) {
      TORCH_CHECK(dk->size(2) == p.Ho && dk->size(3) == p.Wo, "dk_ops: bad kernel_offset shape ", dk->sizes());
      p.P = p.L;
    }
  }
  TORCH_CHECK(p.Gk >= 1 && p.Co % p.Gk == 0, "dk_ops: kernel-offset groups must divide out_channels");
  p.Cok = p.Co / p.Gk;
  p.Gi = 1;
  if (p.has_off) {
    TORCH_CHECK(off->dim() == 4 && off->size(0) == p.N && off->size(1) % (2 * p.K) == 0 && off->size(2) == p.Ho &&
                    off->size(3) == p.Wo,
                "dk_ops: bad offset shape ", off->sizes());
    p.Gi = off->size(1) / (2 * p.K);
  }
  TORCH_CHECK(p.Gi >= 1 && p.C % p.Gi == 0, "dk_ops: offset groups must divide in_channels");
  p.Cig = p.C / p.Gi;
  p.Gm = 1;
  if (p.has_mask) {
    TORCH_CHECK(mask->dim() == 4 && mask->size(0) == p.N && mask->size(1) % p.K == 0 && mask->size(2) == p.Ho &&
                    mask->size(3) == p.Wo,
                "dk_ops: bad mask shape ", mask->sizes());
    p.Gm = mask->size(1) / p.K;
  }
  TORCH_CHECK(p.Gm >= 1 && p.C % p.Gm == 0, "dk_ops: mask groups must divide in_channels");
  p.Cmg = p.C / p.Gm;
  return p;
}

// Outputs take the memory format of their argument, as conv2d's do: channels-last
// when the argument is channels-last (and not also plain contiguous), else contiguous.
// dk_ops/_native.py's fake kernels apply the same rule.
inline at::MemoryFormat format_of(const at::Tensor& t) {
  const bool cl = t.defined() && t.dim() == 4 && !t.is_contiguous() &&
                  t.is_contiguous(at::MemoryFormat::ChannelsLast);
  return cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

inline at::Tensor in_format_of(const at::Tensor& out, const c10::optional<at::Tensor>& ref) {
  if (!out.defined() || out.dim() != 4 || !ref.has_value() || !ref->defined()) return out;
  return out.contiguous(format_of(*ref));
}

// The backward's (input, weight, kernel_offset, offset, mask, bias) gradients in their arguments' formats.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grads_in_formats(
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> g, const at::Tensor& input,
    const at::Tensor& weight, const c10::optional<at::Tensor>& dk, const c10::optional<at::Tensor>& off,
    const c10::optional<at::Tensor>& mask) {
  return std::make_tuple(in_format_of(std::get<0>(g), input), in_format_of(std::get<1>(g), weight),
                         in_format_of(std::get<2>(g), dk), in_format_of(std::get<3>(g), off),
                         in_format_of(std::get<4>(g), mask), std::get<5>(g));
}

// Samples per chunk so that the per-chunk buffers stay under `budget` bytes.
inline int64_t chunk_size(const Params& p, int64_t elem, int64_t budget) {
  const int64_t per = (3 * p.C * p.K + 2 * p.Cg * p.S + 2 * p.Co + 8 * (p.Gi + p.Gk) * p.K) * p.L * elem + 1;
  return std::max<int64_t>(1, std::min<int64_t>(p.N, budget / per));
}

template <typename T>
inline const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <typename T>
inline T* mut_ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// ---------------------------------------------------------------------------------------------
// Passes. Each is written as f(row, j0, j1) over a 2-D iteration space (rows x inner):
// Exec::for_rows runs whole rows on the CPU (f(row, 0, inner), so row-invariant
// index arithmetic happens once per row) and one element per thread on CUDA
// (f(row, j, j + 1)); Exec::for_blocks hands out at most Exec::kBlock inner
// elements at a time, so that passes reducing over channels keep per-position
// accumulators in small local arrays and stream each channel's row contiguously.

// Kernel corners for every (nk, gk, t, position).
template <typename scalar_t, typename acc_t, typename Exec>
void compute_kernel_corners(const Params& p, const scalar_t* dk, int32_t* kidx, acc_t* kwt) {
  DK_PASS("compute_kernel_corners");
  Exec::for_rows(p.Nk * p.Gk * p.K, p.P, 16, DK_LAMBDA(int64_t row, int64_t j0, int64_t j1) {
    const int64_t t = row % p.K;
    const int64_t gk = (row / p.K) % p.Gk;
    const int64_t nk = row / (p.K * p.Gk);
    const int64_t ti = t / p.kw, tj = t % p.kw;
    for (int64_t pp = j0; pp < j1; ++pp) {
      const int64_t i = row * p.P + pp;
      kernel_bilinear<acc_t>(p, dk, nk, gk, t, ti, tj, pp, kidx + 4 * i, kwt + 4 * i, (acc_t*)nullptr,
                             (acc_t*)nullptr);
    }
  });
}

// Image corners of the chunk [n0, n0 + nb) for every (n, gi, t, l).
template <typename scalar_t, typename acc_t, typename Exec>
void compute_image_corners(const Params& p, const scalar_t* off, int64_t n0, int64_t nb, int32_t* iidx, acc_t* iw) {
  DK_PASS("compute_image_corners");
  Exec::for_rows(nb * p.Gi * p.K * p.Ho, p.Wo, 16, DK_LAMBDA(int64_t row, int64_t j0, int64_t j1) {
    const int64_t ho = row % p.Ho;
    const int64_t t = (row / p.Ho) % p.K;
    const int64_t gi = (row / (p.Ho * p.K)) % p.Gi;
    const int64_t n = row / (p.Ho * p.K * p.Gi);
    const int64_t ti = t / p.kw, tj = t % p.kw;
    for (int64_t wo = j0; wo < j1; ++wo) {
      const int64_t i = row * p.Wo + wo;
      image_bilinear<acc_t>(p, off, n0 + n, gi, t, ti, tj, ho, wo, iidx + 4 * i, iw + 4 * i, (acc_t*)nullptr,
                            (acc_t*)nullptr);
    }
  });
}

// Columns (nb, C, K, L): xs = sampled input; X = xs * mask (X may alias xs when no mask).
template <typename scalar_t, typename acc_t, typename Exec>
void compute_columns(const Params& p, const scalar_t* x, const scalar_t* mask, int64_t n0, int64_t nb,
                     const int32_t* iidx, const acc_t* iw, acc_t* xs, acc_t* X) {
  DK_PASS("compute_columns");
  Exec::for_rows(nb * p.C * p.K * p.Ho, p.Wo, 4, DK_LAMBDA(int64_t row, int64_t j0, int64_t j1) {
    const int64_t ho = row % p.Ho;
    const int64_t t = (row / p.Ho) % p.K;
    const int64_t c = (row / (p.Ho * p.K)) % p.C;
    const int64_t n = row / (p.Ho * p.K * p.C);
    const int64_t ti = t / p.kw, tj = t % p.kw;
    const scalar_t* plane = x + ((n0 + n) * p.C + c) * p.H * p.W;
    const int64_t ibase = (((n * p.Gi + c / p.Cig) * p.K + t) * p.L + ho * p.Wo) * 4;
    const scalar_t* mrow = p.has_mask ? mask + (((n0 + n) * p.Gm + c / p.Cmg) * p.K + t) * p.L + ho * p.Wo : nullptr;
    acc_t* xsr = xs + row * p.Wo;
    acc_t* Xr = X + row * p.Wo;
    for (int64_t wo = j0; wo < j1; ++wo) {
      acc_t v;
      if (p.has_off) {
        const int64_t ib = ibase + 4 * wo;
        v = iw[ib] * acc_t(plane[iidx[ib]]) + iw[ib + 1] * acc_t(plane[iidx[ib + 1]]) +
            iw[ib + 2] * acc_t(plane[iidx[ib + 2]]) + iw[ib + 3] * acc_t(plane[iidx[ib + 3]]);
      } else {
        const int64_t r = rigid_index(p, ti, tj, ho, wo);
        v = r >= 0 ? acc_t(plane[r]) : acc_t(0);
      }
      if (p.has_mask) {
        xsr[wo] = v;
        Xr[wo] = v * acc_t(mrow[wo]);
      } else {
        Xr[wo] = v;
      }
    }
  });
}

// Sampled kernel Wk (Nk, Co, Cg, K) for kernel offsets constant over positions.
template <typename scalar_t, typename acc_t, typename Exec>
void compute_sampled_kernel(const Params& p, const scalar_t* w, const int32_t* kidx, const acc_t* kwt, acc_t* wk) {
  DK_PASS("compute_sampled_kernel");
  const int64_t total = p.Nk * p.Co * p.Cg * p.K;
  Exec::for_each(total, grain_for(8), DK_LAMBDA(int64_t i) {
    const int64_t t = i % p.K;
    const int64_t c = (i / p.K) % p.Cg;
    const int64_t o = (i / (p.K * p.Cg)) % p.Co;
    const int64_t nk = i / (p.K * p.Cg * p.Co);
    const int64_t kb = kcorner_base(p, nk, o / p.Cok, t, 0);
    const scalar_t* plane = w + (o * p.Cg + c) * p.S;
    acc_t s = acc_t(0);
#pragma unroll
    for (int q = 0; q < 4; ++q) s += kwt[kb + q] * acc_t(plane[kidx[kb + q]]);
    wk[i] = s;
  });
}

// Scattered columns Z (nb, Cg*S, L) of conv group g for kernel group gk; each element
// (n, c, l) owns the column Z[n, c, :, l].
template <typename scalar_t, typename acc_t, typename Exec>
void compute_scattered(const Params& p, int64_t g, int64_t gk, int64_t n0, int64_t nb, const acc_t* X,
                       const int32_t* kidx, const acc_t* kwt, acc_t* Z) {
  DK_PASS("compute_scattered");
  Exec::for_rows(nb * p.Cg, p.L, 4 * p.K + p.S, DK_LAMBDA(int64_t row, int64_t j0, int64_t j1) {
    const int64_t c = row % p.Cg;
    const int64_t n = row / p.Cg;
    const int64_t nk = p.Nk == 1 ? 0 : n0 + n;
    acc_t* zr = Z + row * p.S * p.L;
    const acc_t* xr = X + ((n * p.C + g * p.Cg + c) * p.K) * p.L;
    for (int64_t s = 0; s < p.S; ++s)
      for (int64_t l = j0; l < j1; ++l) zr[s * p.L + l] = acc_t(0);
    for (int64_t t = 0; t < p.K; ++t) {
      for (int64_t l = j0; l < j1; ++l) {
        const acc_t xv = xr[t * p.L + l];
        const int64_t kb = kcorner_base(p, nk, gk, t, l);
#pragma unroll
        for (int q = 0; q < 4; ++q) zr[int64_t(kidx[kb + q]) * p.L + l] += kwt[kb + q] * xv;
      }
    }
  });
}

struct KernelCorners {
  at::Tensor idx, w;
};

template <typename scalar_t, typename acc_t, typename Exec>
KernelCorners kernel_corners(const Params& p, const at::Tensor& weight, const at::Tensor& dk) {
  auto acc_opts = weight.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  KernelCorners kc;
  kc.idx = at::empty({p.Nk * p.Gk * p.K * p.P * 4}, weight.options().dtype(at::kInt));
  kc.w = at::empty({p.Nk * p.Gk * p.K * p.P * 4}, acc_opts);
  compute_kernel_corners<scalar_t, acc_t, Exec>(p, ptr_or_null<scalar_t>(dk), kc.idx.data_ptr<int32_t>(),
                                                kc.w.data_ptr<acc_t>());
  return kc;
}

// Depthwise, rigid image sampling, kernel constant over positions (no or global kernel
// offsets): direct loops over the input instead of columns and a batched (1 x K) @ (K x L)
// matmul per channel, when the device's Exec asks for them (the CPU does).
template <typename Exec>
inline bool direct_depthwise_global(const Params& p) {
  return Exec::direct_depthwise_global() && p.P == 1 && p.Cg == 1 && !p.has_off && !p.has_mask;
}

// ---------------------------------------------------------------------------------------------
// Forward.

template <typename scalar_t, typename Exec>
at::Tensor forward_impl(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& dk, const at::Tensor& off,
                        const at::Tensor& mask, const at::Tensor& bias, const Params& p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int B = Exec::kBlock;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  auto acc_opts = input.options().dtype(acc_dtype);
  at::Tensor y = at::empty({p.N, p.Co, p.L}, acc_opts);
  if (p.N == 0) return y.view({p.N, p.Co, p.Ho, p.Wo}).to(input.scalar_type());

  const scalar_t* x = input.data_ptr<scalar_t>();
  const scalar_t* w = weight.data_ptr<scalar_t>();
  const scalar_t* offp = ptr_or_null<scalar_t>(off);
  const scalar_t* maskp = ptr_or_null<scalar_t>(mask);
  KernelCorners kc = kernel_corners<scalar_t, acc_t, Exec>(p, weight, dk);
  const int32_t* kidx = kc.idx.data_ptr<int32_t>();
  const acc_t* kwt = kc.w.data_ptr<acc_t>();
  at::Tensor wk;
  if (p.P == 1) {
    wk = at::empty({p.Nk, p.G, p.Cog, p.Cg * p.K}, acc_opts);
    compute_sampled_kernel<scalar_t, acc_t, Exec>(p, w, kidx, kwt, wk.data_ptr<acc_t>());
  }
  const at::Tensor w_acc = weight.to(acc_dtype).reshape({p.Co, p.Cg * p.S});
  const auto pairs = group_pairs(p);
  const int64_t nbmax = chunk_size(p, sizeof(acc_t), Exec::chunk_budget());
  for (int64_t n0 = 0; n0 < p.N; n0 += nbmax) {
    const int64_t nb = std::min(nbmax, p.N - n0);
    at::Tensor iidx, iw;
    if (p.has_off) {
      iidx = at::empty({nb * p.Gi * p.K * p.L * 4}, input.options().dtype(at::kInt));
      iw = at::empty({nb * p.Gi * p.K * p.L * 4}, acc_opts);
      compute_image_corners<scalar_t, acc_t, Exec>(p, offp, n0, nb, iidx.data_ptr<int32_t>(), iw.data_ptr<acc_t>());
    }
    const bool direct = p.P != 1 && p.Cg == 1;  // depthwise, local kernel offsets: no column buffer
    const bool direct_global = direct_depthwise_global<Exec>(p);  // depthwise, one kernel per sample
    at::Tensor X;
    if (!direct && !direct_global) {
      X = at::empty({nb, p.C, p.K, p.L}, acc_opts);
      compute_columns<scalar_t, acc_t, Exec>(p, x, maskp, n0, nb, ptr_or_null<int32_t>(iidx),
                                             ptr_or_null<acc_t>(iw), X.data_ptr<acc_t>(), X.data_ptr<acc_t>());
    }
    const int32_t* iidxp = ptr_or_null<int32_t>(iidx);
    const acc_t* iwp = ptr_or_null<acc_t>(iw);
    at::Tensor y_chunk = y.narrow(0, n0, nb);
    if (direct_global) {
      DK_PASS("dw_global_forward");
      acc_t* yp = y_chunk.data_ptr<acc_t>();
      const acc_t* wkp = wk.data_ptr<acc_t>();
      Exec::for_rows(nb * p.Co * p.Ho, p.Wo, p.K, DK_LAMBDA(int64_t row, int64_t j0, int64_t j1) {
        const int64_t ho = row % p.Ho;
        const int64_t o = (row / p.Ho) % p.Co;
        const int64_t n = row / (p.Ho * p.Co);
        const scalar_t* plane = x + ((n0 + n) * p.C + o / p.Cog) * p.H * p.W;
        const acc_t* wr = wkp + ((p.Nk == 1 ? 0 : n0 + n) * p.Co + o) * p.K;
        acc_t* yr = yp + (n * p.Co + o) * p.L + ho * p.Wo;
        for (int64_t wo = j0; wo < j1; ++wo) yr[wo] = acc_t(0);
        for (int64_t t = 0; t < p.K; ++t) {
          const int64_t yy = ho * p.sth - p.ph + (t / p.kw) * p.dh;
          if (yy < 0 || yy >= p.H) continue;
          const acc_t wv = wr[t];
          const scalar_t* prow = plane + yy * p.W;
          const int64_t x0 = (t % p.kw) * p.dw - p.pw;
          for (int64_t wo = j0; wo < j1; ++wo) {
            const int64_t xx = wo * p.stw + x0;
            if (xx >= 0 && xx < p.W) yr[wo] += wv * acc_t(prow[xx]);
          }
        }
      });
    } else if (p.P == 1) {
      at::Tensor wk_chunk = p.Nk == 1 ? wk : wk.narrow(0, n0, nb);
      y_chunk.view({nb, p.G, p.Cog, p.L}).copy_(at::matmul(wk_chunk, X.view({nb, p.G, p.Cg * p.K, p.L})));
    } else if (direct) {
      // Depthwise, local kernel offsets: direct kernel, the input sampled on the fly.
      DK_PASS("dw_forward");
      acc_t* yp = y_chunk.data_ptr<acc_t>();
      Exec::for_blocks(nb * p.Co * p.Ho, p.Wo, 6 * p.K, DK_LAMBDA(int64_t row, int64_t j0, int64_t j1) {
        const int64_t ho = row % p.Ho;
        const int64_t o = (row / p.Ho) % p.Co;
        const int64_t n = row / (p.Ho * p.Co);
        const int64_t c = o / p.Cog;  // depthwise: conv group == input channel
        const int64_t gk = o / p.Cok;
        const scalar_t* plane = x + ((n0 + n) * p.C + c) * p.H * p.W;
        const scalar_t* wo_ = w + o * p.S;
        const int64_t nj = j1 - j0;
        acc_t acc[B];
        for (int64_t j = 0; j < nj; ++j) acc[j] = acc_t(0);
        for (int64_t t = 0; t < p.K; ++t) {
          const int64_t ti = t / p.kw, tj = t % p.kw;
          const int64_t kb0 = kcorner_base(p, n0 + n, gk, t, 0) + 4 * ho * p.Wo;
          const int64_t ib0 = (((n * p.Gi + c / p.Cig) * p.K + t) * p.L + ho * p.Wo) * 4;
          const scalar_t* mrow =
              p.has_mask ? maskp + (((n0 + n) * p.Gm + c / p.Cmg) * p.K + t) * p.L + ho * p.Wo : nullptr;
          for (int64_t j = 0; j < nj; ++j) {
            const int64_t wo = j0 + j;
            acc_t xv;
            if (p.has_off) {
              const int64_t ib = ib0 + 4 * wo;
              xv = iwp[ib] * acc_t(plane[iidxp[ib]]) + iwp[ib + 1] * acc_t(plane[iidxp[ib + 1]]) +
                   iwp[ib + 2] * acc_t(plane[iidxp[ib + 2]]) + iwp[ib + 3] * acc_t(plane[iidxp[ib + 3]]);
            } else {
              const int64_t r = rigid_index(p, ti, tj, ho, wo);
              xv = r >= 0 ? acc_t(plane[r]) : acc_t(0);
            }
            if (p.has_mask) xv = xv * acc_t(mrow[wo]);
            const int64_t kb = kb0 + 4 * wo;
            const acc_t wv = kwt[kb] * acc_t(wo_[kidx[kb]]) + kwt[kb + 1] * acc_t(wo_[kidx[kb + 1]]) +
                             kwt[kb + 2] * acc_t(wo_[kidx[kb + 2]]) + kwt[kb + 3] * acc_t(wo_[kidx[kb + 3]]);
            acc[j] += wv * xv;
          }
        }
        for (int64_t j = 0; j < nj; ++j) yp[(n * p.Co + o) * p.L + ho * p.Wo + j0 + j] = acc[j];
      });
    } else {
      at::Tensor Z = at::empty({nb, p.Cg * p.S, p.L}, acc_opts);
      for (const auto& pr : pairs) {
        compute_scattered<scalar_t, acc_t, Exec>(p, pr.g, pr.gk, n0, nb, X.data_ptr<acc_t>(), kidx, kwt,
                                                 Z.data_ptr<acc_t>());
        y_chunk.narrow(1, pr.o_lo, pr.o_hi - pr.o_lo)
            .copy_(at::matmul(w_acc.narrow(0, pr.o_lo, pr.o_hi - pr.o_lo), Z));
      }
    }
  }
  if (bias.defined()) y.add_(bias.to(acc_dtype).view({1, p.Co, 1}));
  return y.view({p.N, p.Co, p.Ho, p.Wo}).to(input.scalar_type());
}

// Weight gradient and global kernel-offset gradient from gWk (nb, Co, Cg, K), the gradient of
// the per-sample sampled kernel (kernel offsets constant over positions).
template <typename scalar_t, typename acc_t, typename Exec>
void sampled_kernel_grads(const Params& p, int64_t n0, int64_t nb, const acc_t* gwkp, const scalar_t* w,
                          const scalar_t* dkp, const int32_t* kidx, const acc_t* kwt, bool need_w, bool need_dk,
                          acc_t* gwp, acc_t* gdkp) {
  if (need_w) {
    DK_PASS("gw_from_wk");
    // Each item owns gW[o, c, :]; samples in a fixed order (deterministic).
    Exec::for_each(p.Co * p.Cg, grain_for(nb * p.K * 4), DK_LAMBDA(int64_t i) {
      const int64_t c = i % p.Cg;
      const int64_t o = i / p.Cg;
      acc_t* gwo = gwp + i * p.S;
      for (int64_t n = 0; n < nb; ++n) {
        const int64_t nk = p.Nk == 1 ? 0 : n0 + n;
        const acc_t* gr = gwkp + ((n * p.Co + o) * p.Cg + c) * p.K;
        for (int64_t t = 0; t < p.K; ++t) {
          const int64_t kb = kcorner_base(p, nk, o / p.Cok, t, 0);
#pragma unroll
          for (int q = 0; q < 4; ++q) gwo[kidx[kb + q]] += kwt[kb + q] * gr[t];
        }
      }
    });
  }
  if (need_dk) {  // global kernel offsets (N, 2*Gk*K)
    DK_PASS("gdk_global");
    Exec::for_each(nb * p.Gk * p.K, 1, DK_LAMBDA(int64_t i) {
      const int64_t t = i % p.K;
      const int64_t gk = (i / p.K) % p.Gk;
      const int64_t n = i / (p.K * p.Gk);
      int32_t ci[4];
      acc_t cw[4], cy[4], cx[4];
      kernel_bilinear<acc_t>(p, dkp, n0 + n, gk, t, t / p.kw, t % p.kw, 0, ci, cw, cy, cx);
      acc_t gu = acc_t(0), gv = acc_t(0);
      for (int64_t o = gk * p.Cok; o < (gk + 1) * p.Cok; ++o) {
        for (int64_t c = 0; c < p.Cg; ++c) {
          const acc_t gr = gwkp[((n * p.Co + o) * p.Cg + c) * p.K + t];
          const scalar_t* plane = w + (o * p.Cg + c) * p.S;
          acc_t du = acc_t(0), dv = acc_t(0);
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const acc_t wv = acc_t(plane[ci[q]]);
            du += cy[q] * wv;
            dv += cx[q] * wv;
          }
          gu += gr * du;
          gv += gr * dv;
        }
      }
      const int64_t base = (n0 + n) * 2 * p.Gk * p.K + 2 * (gk * p.K + t);
      gdkp[base] = gu;
      gdkp[base + 1] = gv;
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Backward. output_mask: (input, weight, kernel_offset, offset, mask, bias).

template <typename scalar_t, typename Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& dk,
    const at::Tensor& off, const at::Tensor& mask, const Params& p, std::array<bool, 6> need) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int B = Exec::kBlock;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  auto acc_opts = input.options().dtype(acc_dtype);
  const auto dtype = input.scalar_type();
  const bool need_in = need[0];
  const bool need_w = need[1];
  const bool need_dk = need[2] && p.has_dk;
  const bool need_off = need[3] && p.has_off;
  const bool need_mask = need[4] && p.has_mask;
  const bool need_gx = need_in || need_off || need_mask;

  at::Tensor g_in = need_in ? at::zeros({p.N, p.C, p.H, p.W}, acc_opts) : at::Tensor();
  at::Tensor g_w = need_w ? at::zeros({p.Co, p.Cg * p.S}, acc_opts) : at::Tensor();
  at::Tensor g_dk = need_dk ? at::zeros(dk.sizes(), acc_opts) : at::Tensor();
  at::Tensor g_off = need_off ? at::empty(off.sizes(), acc_opts) : at::Tensor();
  at::Tensor g_mask = need_mask ? at::empty(mask.sizes(), acc_opts) : at::Tensor();
  at::Tensor g_bias;
  if (need[5]) g_bias = grad.to(acc_dtype).sum(at::IntArrayRef{0, 2, 3});

  if (p.N > 0 && (need_gx || need_w || need_dk)) {
    const scalar_t* x = input.data_ptr<scalar_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    const scalar_t* dkp = ptr_or_null<scalar_t>(dk);
    const scalar_t* offp = ptr_or_null<scalar_t>(off);
    const scalar_t* maskp = ptr_or_null<scalar_t>(mask);
    KernelCorners kc = kernel_corners<scalar_t, acc_t, Exec>(p, weight, dk);
    const int32_t* kidx = kc.idx.data_ptr<int32_t>();
    const acc_t* kwt = kc.w.data_ptr<acc_t>();
    at::Tensor wk;
    if (p.P == 1) {
      wk = at::empty({p.Nk, p.G, p.Cog, p.Cg * p.K}, acc_opts);
      compute_sampled_kernel<scalar_t, acc_t, Exec>(p, w, kidx, kwt, wk.data_ptr<acc_t>());
    }
    const at::Tensor w_acc = weight.to(acc_dtype).reshape({p.Co, p.Cg * p.S});
    const auto pairs = group_pairs(p);
    acc_t* gwp = mut_ptr_or_null<acc_t>(g_w);
    acc_t* gdkp = mut_ptr_or_null<acc_t>(g_dk);
    acc_t* goffp = mut_ptr_or_null<acc_t>(g_off);
    acc_t* gmaskp = mut_ptr_or_null<acc_t>(g_mask);
    acc_t* ginp = mut_ptr_or_null<acc_t>(g_in);
    const int64_t nbmax = chunk_size(p, sizeof(acc_t), Exec::chunk_budget());
    for (int64_t n0 = 0; n0 < p.N; n0 += nbmax) {
      const int64_t nb = std::min(nbmax, p.N - n0);
      at::Tensor gy = grad.narrow(0, n0, nb).to(acc_dtype).reshape({nb, p.Co, p.L}).contiguous();
      const acc_t* gyp = gy.data_ptr<acc_t>();
      at::Tensor iidx, iw;
      if (p.has_off) {
        iidx = at::empty({nb * p.Gi * p.K * p.L * 4}, input.options().dtype(at::kInt));
        iw = at::empty({nb * p.Gi * p.K * p.L * 4}, acc_opts);
        compute_image_corners<scalar_t, acc_t, Exec>(p, offp, n0, nb, iidx.data_ptr<int32_t>(),
                                                     iw.data_ptr<acc_t>());
      }
      const int32_t* iidxp = ptr_or_null<int32_t>(iidx);
      const acc_t* iwp = ptr_or_null<acc_t>(iw);
      // Depthwise with local kernel offsets may run as one fused pass (CPU), which
      // samples the input on the fly and also applies the mask to gX.
      const bool fused = p.P != 1 && p.Cg == 1 && Exec::fused_depthwise_backward();
      const bool direct_global = direct_depthwise_global<Exec>(p);
      at::Tensor X, xs;
      if (!fused && !direct_global) {
        X = at::empty({nb, p.C, p.K, p.L}, acc_opts);
        xs = p.has_mask ? at::empty({nb, p.C, p.K, p.L}, acc_opts) : X;
        compute_columns<scalar_t, acc_t, Exec>(p, x, maskp, n0, nb, iidxp, iwp, xs.data_ptr<acc_t>(),
                                               X.data_ptr<acc_t>());
      }
      const acc_t* Xp = ptr_or_null<acc_t>(X);
      const acc_t* xsp = ptr_or_null<acc_t>(xs);
      // gX is accumulated over (conv group, kernel group) pairs only in the general local path.
      const bool gx_accumulates = p.P != 1 && p.Cg != 1;
      at::Tensor gX;
      if (need_gx && !direct_global) {
        gX = gx_accumulates ? at::zeros({nb, p.C, p.K, p.L}, acc_opts) : at::empty({nb, p.C, p.K, p.L}, acc_opts);
      }
      acc_t* gXp = mut_ptr_or_null<acc_t>(gX);

      if (direct_global) {
        const acc_t* wkp = wk.data_ptr<acc_t>();
        if (need_w || need_dk) {
          // gWk[n, o, t] = sum_l gy[n, o, l] * x[n, c, tap t of l]: one owner per (n, o, t).
          DK_PASS("dw_global_gwk");
          at::Tensor gwk = at::empty({nb, p.Co, p.K}, acc_opts);
          acc_t* gwkw = gwk.data_ptr<acc_t>();
          Exec::for_each(nb * p.Co * p.K, grain_for(p.L), DK_LAMBDA(int64_t i) {
            const int64_t t = i % p.K;
            const int64_t o = (i / p.K) % p.Co;
            const int64_t n = i / (p.K * p.Co);
            const scalar_t* plane = x + ((n0 + n) * p.C + o / p.Cog) * p.H * p.W;
            const acc_t* gyr = gyp + (n * p.Co + o) * p.L;
            const int64_t y0 = (t / p.kw) * p.dh - p.ph, x0 = (t % p.kw) * p.dw - p.pw;
            acc_t s = acc_t(0);
            for (int64_t ho = 0; ho < p.Ho; ++ho) {
              const int64_t yy = ho * p.sth + y0;
              if (yy < 0 || yy >= p.H) continue;
              const scalar_t* prow = plane + yy * p.W;
              const acc_t* g = gyr + ho * p.Wo;
              for (int64_t wo = 0; wo < p.Wo; ++wo) {
                const int64_t xx = wo * p.stw + x0;
                if (xx >= 0 && xx < p.W) s += g[wo] * acc_t(prow[xx]);
              }
            }
            gwkw[i] = s;
          });
          sampled_kernel_grads<scalar_t, acc_t, Exec>(p, n0, nb, gwk.data_ptr<acc_t>(), w, dkp, kidx, kwt, need_w,
                                                      need_dk, gwp, gdkp);  // gwk is (nb, Co, Cg = 1, K)
        }
        if (need_in) {
          // gin[n, c] += sum over the channel's outputs and taps of wk * gy: one owner per plane.
          DK_PASS("dw_global_ginput");
          Exec::for_each(nb * p.C, 1, DK_LAMBDA(int64_t nc) {
            const int64_t n = nc / p.C, c = nc % p.C;
            acc_t* plane = ginp + ((n0 + n) * p.C + c) * p.H * p.W;
            for (int64_t o = c * p.Cog; o < (c + 1) * p.Cog; ++o) {
              const acc_t* wr = wkp + ((p.Nk == 1 ? 0 : n0 + n) * p.Co + o) * p.K;
              const acc_t* gyr = gyp + (n * p.Co + o) * p.L;
              for (int64_t t = 0; t < p.K; ++t) {
                const acc_t wv = wr[t];
                const int64_t y0 = (t / p.kw) * p.dh - p.ph, x0 = (t % p.kw) * p.dw - p.pw;
                for (int64_t ho = 0; ho < p.Ho; ++ho) {
                  const int64_t yy = ho * p.sth + y0;
                  if (yy < 0 || yy >= p.H) continue;
                  acc_t* prow = plane + yy * p.W;
                  const acc_t* g = gyr + ho * p.Wo;
                  for (int64_t wo = 0; wo < p.Wo; ++wo) {
                    const int64_t xx = wo * p.stw + x0;
                    if (xx >= 0 && xx < p.W) prow[xx] += wv * g[wo];
                  }
                }
              }
            }
          });
        }
      } else if (p.P == 1) {
        // y = Wk @ X per (n, group).
        at::Tensor wk_chunk = p.Nk == 1 ? wk : wk.narrow(0, n0, nb);
        at::Tensor gy4 = gy.view({nb, p.G, p.Cog, p.L});
        at::Tensor X4 = X.view({nb, p.G, p.Cg * p.K, p.L});
        if (need_w || need_dk) {
          at::Tensor gwk = at::matmul(gy4, X4.transpose(-1, -2)).contiguous();  // (nb, G, Cog, Cg*K)
          sampled_kernel_grads<scalar_t, acc_t, Exec>(p, n0, nb, gwk.data_ptr<acc_t>(), w, dkp, kidx, kwt, need_w,
                                                      need_dk, gwp, gdkp);
        }
        if (need_gx) {
          gX.view({nb, p.G, p.Cg * p.K, p.L}).copy_(at::matmul(wk_chunk.transpose(-1, -2), gy4));
        }
      } else if (fused) {
        DK_PASS("dw_backward_fused");
        Exec::template dw_local_backward<scalar_t, acc_t>(p, n0, nb, x, w, maskp, dkp, iidxp, iwp, gyp, need_w,
                                                          need_dk, need_mask, gwp, gdkp, gXp, gmaskp);
      } else if (p.Cg == 1) {
        // Depthwise, local kernel offsets: direct kernels.
        if (need_w) {
          DK_PASS("gw_depthwise");
          Exec::template gw_depthwise<scalar_t, acc_t>(p, n0, nb, gyp, Xp, kidx, kwt, gwp);
        }
        if (need_dk) {
          DK_PASS("gdk_depthwise");
          Exec::for_blocks(nb * p.Gk * p.K, p.L, p.Cok * 6, DK_LAMBDA(int64_t row, int64_t j0, int64_t j1) {
            const int64_t t = row % p.K;
            const int64_t gk = (row / p.K) % p.Gk;
            const int64_t n = row / (p.K * p.Gk);
            const int64_t ti = t / p.kw, tj = t % p.kw;
            const int64_t nj = j1 - j0;
            int32_t ci[B][4];
            acc_t cy[B][4], cx[B][4], gu[B], gv[B];
            for (int64_t j = 0; j < nj; ++j) {
              acc_t cw[4];
              kernel_bilinear<acc_t>(p, dkp, n0 + n, gk, t, ti, tj, j0 + j, ci[j], cw, cy[j], cx[j]);
              gu[j] = acc_t(0);
              gv[j] = acc_t(0);
            }
            for (int64_t o = gk * p.Cok; o < (gk + 1) * p.Cok; ++o) {
              const int64_t c = o / p.Cog;
              const acc_t* gyr = gyp + (n * p.Co + o) * p.L + j0;
              const acc_t* xr = Xp + ((n * p.C + c) * p.K + t) * p.L + j0;
              const scalar_t* plane = w + o * p.S;
              for (int64_t j = 0; j < nj; ++j) {
                const acc_t gr = gyr[j] * xr[j];
                acc_t du = acc_t(0), dv = acc_t(0);
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                  const acc_t wv = acc_t(plane[ci[j][q]]);
                  du += cy[j][q] * wv;
                  dv += cx[j][q] * wv;
                }
                gu[j] += gr * du;
                gv[j] += gr * dv;
              }
            }
            const int64_t base = ((n0 + n) * 2 * p.Gk * p.K + 2 * (gk * p.K + t)) * p.L + j0;
            for (int64_t j = 0; j < nj; ++j) {
              gdkp[base + j] = gu[j];
              gdkp[base + p.L + j] = gv[j];
            }
          });
        }
        if (need_gx) {
          DK_PASS("gX_depthwise");
          Exec::for_blocks(nb * p.C * p.K, p.L, p.Cog * 6, DK_LAMBDA(int64_t row, int64_t j0, int64_t j1) {
            const int64_t t = row % p.K;
            const int64_t c = (row / p.K) % p.C;
            const int64_t n = row / (p.K * p.C);
            const int64_t nj = j1 - j0;
            acc_t s[B];
            for (int64_t j = 0; j < nj; ++j) s[j] = acc_t(0);
            for (int64_t o = c * p.Cog; o < (c + 1) * p.Cog; ++o) {
              const int64_t kb0 = kcorner_base(p, n0 + n, o / p.Cok, t, 0);
              const scalar_t* plane = w + o * p.S;
              const acc_t* gyr = gyp + (n * p.Co + o) * p.L;
              for (int64_t j = 0; j < nj; ++j) {
                const int64_t l = j0 + j;
                const int64_t kb = kb0 + 4 * l;
                const acc_t wv = kwt[kb] * acc_t(plane[kidx[kb]]) + kwt[kb + 1] * acc_t(plane[kidx[kb + 1]]) +
                                 kwt[kb + 2] * acc_t(plane[kidx[kb + 2]]) + kwt[kb + 3] * acc_t(plane[kidx[kb + 3]]);
                s[j] += wv * gyr[l];
              }
            }
            for (int64_t j = 0; j < nj; ++j) gXp[row * p.L + j0 + j] = s[j];
          });
        }
      } else {
        // General groups, local kernel offsets: scattered columns.
        at::Tensor Z = at::empty({nb, p.Cg * p.S, p.L}, acc_opts);
        for (const auto& pr : pairs) {
          const int64_t no = pr.o_hi - pr.o_lo;
          at::Tensor gyo = gy.narrow(1, pr.o_lo, no);  // (nb, no, L)
          if (need_w) {
            compute_scattered<scalar_t, acc_t, Exec>(p, pr.g, pr.gk, n0, nb, Xp, kidx, kwt, Z.data_ptr<acc_t>());
            g_w.narrow(0, pr.o_lo, no).add_(at::matmul(gyo, Z.transpose(-1, -2)).sum(0));
          }
          if (!(need_gx || need_dk)) continue;
          at::Tensor gZ = at::matmul(w_acc.narrow(0, pr.o_lo, no).t(), gyo).contiguous();  // (nb, Cg*S, L)
          const acc_t* gZp = gZ.data_ptr<acc_t>();
          const int64_t g = pr.g, gk = pr.gk;
          if (need_gx) {
            DK_PASS("gX_scattered");
            Exec::for_rows(nb * p.Cg * p.K, p.L, 8, DK_LAMBDA(int64_t row, int64_t j0, int64_t j1) {
              const int64_t t = row % p.K;
              const int64_t c = (row / p.K) % p.Cg;
              const int64_t n = row / (p.K * p.Cg);
              const int64_t kb0 = kcorner_base(p, p.Nk == 1 ? 0 : n0 + n, gk, t, 0);
              const acc_t* gz = gZp + (n * p.Cg + c) * p.S * p.L;
              acc_t* gxr = gXp + ((n * p.C + g * p.Cg + c) * p.K + t) * p.L;
              for (int64_t l = j0; l < j1; ++l) {
                const int64_t kb = kb0 + 4 * l;
                acc_t s = acc_t(0);
#pragma unroll
                for (int q = 0; q < 4; ++q) s += kwt[kb + q] * gz[int64_t(kidx[kb + q]) * p.L + l];
                gxr[l] += s;
              }
            });
          }
          if (need_dk) {
            DK_PASS("gdk_scattered");
            Exec::for_blocks(nb * p.K, p.L, p.Cg * 10, DK_LAMBDA(int64_t row, int64_t j0, int64_t j1) {
              const int64_t t = row % p.K;
              const int64_t n = row / p.K;
              const int64_t ti = t / p.kw, tj = t % p.kw;
              const int64_t nj = j1 - j0;
              int32_t ci[B][4];
              acc_t cy[B][4], cx[B][4], gu[B], gv[B];
              for (int64_t j = 0; j < nj; ++j) {
                acc_t cw[4];
                kernel_bilinear<acc_t>(p, dkp, n0 + n, gk, t, ti, tj, j0 + j, ci[j], cw, cy[j], cx[j]);
                gu[j] = acc_t(0);
                gv[j] = acc_t(0);
              }
              for (int64_t c = 0; c < p.Cg; ++c) {
                const acc_t* xr = Xp + ((n * p.C + g * p.Cg + c) * p.K + t) * p.L + j0;
                const acc_t* gz = gZp + (n * p.Cg + c) * p.S * p.L + j0;
                for (int64_t j = 0; j < nj; ++j) {
                  acc_t du = acc_t(0), dv = acc_t(0);
#pragma unroll
                  for (int q = 0; q < 4; ++q) {
                    const acc_t zv = gz[int64_t(ci[j][q]) * p.L + j];
                    du += cy[j][q] * zv;
                    dv += cx[j][q] * zv;
                  }
                  gu[j] += xr[j] * du;
                  gv[j] += xr[j] * dv;
                }
              }
              const int64_t base = ((n0 + n) * 2 * p.Gk * p.K + 2 * (gk * p.K + t)) * p.L + j0;
              for (int64_t j = 0; j < nj; ++j) {
                gdkp[base + j] += gu[j];
                gdkp[base + p.L + j] += gv[j];
              }
            });
          }
        }
      }

      // Image side: mask, input and image-offset gradients from gX (the columns' gradient).
      if (need_mask && !fused) {
        DK_PASS("grad_mask");
        Exec::for_blocks(nb * p.Gm * p.K, p.L, p.Cmg * 2, DK_LAMBDA(int64_t row, int64_t j0, int64_t j1) {
          const int64_t t = row % p.K;
          const int64_t gm = (row / p.K) % p.Gm;
          const int64_t n = row / (p.K * p.Gm);
          const int64_t nj = j1 - j0;
          acc_t s[B];
          for (int64_t j = 0; j < nj; ++j) s[j] = acc_t(0);
          for (int64_t c = gm * p.Cmg; c < (gm + 1) * p.Cmg; ++c) {
            const int64_t r = ((n * p.C + c) * p.K + t) * p.L + j0;
            for (int64_t j = 0; j < nj; ++j) s[j] += gXp[r + j] * xsp[r + j];
          }
          acc_t* out = gmaskp + (((n0 + n) * p.Gm + gm) * p.K + t) * p.L + j0;
          for (int64_t j = 0; j < nj; ++j) out[j] = s[j];
        });
      }
      if (p.has_mask && (need_in || need_off) && !fused) {
        DK_PASS("apply_mask");
        Exec::for_rows(nb * p.C * p.K, p.L, 2, DK_LAMBDA(int64_t row, int64_t j0, int64_t j1) {
          const int64_t t = row % p.K;
          const int64_t c = (row / p.K) % p.C;
          const int64_t n = row / (p.K * p.C);
          const scalar_t* mr = maskp + (((n0 + n) * p.Gm + c / p.Cmg) * p.K + t) * p.L;
          acc_t* gr = gXp + row * p.L;
          for (int64_t l = j0; l < j1; ++l) gr[l] *= acc_t(mr[l]);
        });
      }
      if (need_in && !direct_global) {
        DK_PASS("scatter_input");
        Exec::template scatter_input<acc_t>(p, n0, nb, gXp, iidxp, iwp, ginp);
      }
      if (need_off) {
        DK_PASS("grad_offset");
        Exec::for_blocks(nb * p.Gi * p.K * p.Ho, p.Wo, p.Cig * 10, DK_LAMBDA(int64_t row, int64_t j0, int64_t j1) {
          const int64_t ho = row % p.Ho;
          const int64_t t = (row / p.Ho) % p.K;
          const int64_t gi = (row / (p.Ho * p.K)) % p.Gi;
          const int64_t n = row / (p.Ho * p.K * p.Gi);
          const int64_t ti = t / p.kw, tj = t % p.kw;
          const int64_t nj = j1 - j0;
          int32_t ci[B][4];
          acc_t cy[B][4], cx[B][4], gu[B], gv[B];
          for (int64_t j = 0; j < nj; ++j) {
            acc_t cw[4];
            image_bilinear<acc_t>(p, offp, n0 + n, gi, t, ti, tj, ho, j0 + j, ci[j], cw, cy[j], cx[j]);
            gu[j] = acc_t(0);
            gv[j] = acc_t(0);
          }
          for (int64_t c = gi * p.Cig; c < (gi + 1) * p.Cig; ++c) {
            const acc_t* gr = gXp + ((n * p.C + c) * p.K + t) * p.L + ho * p.Wo + j0;
            const scalar_t* plane = x + ((n0 + n) * p.C + c) * p.H * p.W;
            for (int64_t j = 0; j < nj; ++j) {
              acc_t du = acc_t(0), dv = acc_t(0);
#pragma unroll
              for (int q = 0; q < 4; ++q) {
                const acc_t xv = acc_t(plane[ci[j][q]]);
                du += cy[j][q] * xv;
                dv += cx[j][q] * xv;
              }
              gu[j] += gr[j] * du;
              gv[j] += gr[j] * dv;
            }
          }
          const int64_t base = ((n0 + n) * 2 * p.Gi * p.K + 2 * (gi * p.K + t)) * p.L + ho * p.Wo + j0;
          for (int64_t j = 0; j < nj; ++j) {
            goffp[base + j] = gu[j];
            goffp[base + p.L + j] = gv[j];
          }
        });
      }
    }
  }
  auto out = [&](const at::Tensor& t, bool want, at::IntArrayRef shape) {
    if (!want || !t.defined()) return at::empty({0}, input.options());
    return t.reshape(shape).to(dtype);
  };
  return std::make_tuple(out(g_in, need_in, input.sizes()), out(g_w, need_w, weight.sizes()),
                         out(g_dk, need_dk, p.has_dk ? dk.sizes() : at::IntArrayRef{0}),
                         out(g_off, need_off, p.has_off ? off.sizes() : at::IntArrayRef{0}),
                         out(g_mask, need_mask, p.has_mask ? mask.sizes() : at::IntArrayRef{0}),
                         need[5] ? g_bias.to(dtype) : at::empty({0}, input.options()));
}

}  // namespace detail
}  // namespace dk_ops
