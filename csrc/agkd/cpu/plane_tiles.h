// The CPU tile engine of the SSIM + cosine kernels, shared by agkd::hybrid (hybrid_cpu.cpp)
// and agkd::align (align_cpu.cpp), which runs it on one resampled plane at a time.
//
// Work is split into (plane, row tile) items. A row tile of the forward reads each input
// row once into a padded row buffer, blurs it horizontally into a ring of `window` rows
// (five moments), and combines the ring vertically into the five moments of one output
// row, from which SSIM is summed; cosine sums come from the same rows. Partial sums land
// in a fixed slot per item and are added in a fixed order, so the result does not depend
// on the thread count.
//
// The backward recomputes the moments for the output rows that touch its source rows,
// turns them into dS/dmoment maps (math/ssim.h), blurs those back with the transposed
// window (a gather: every source pixel sums its own contributions, reflect mirrors
// included) and writes both gradients in the same sweep.
//
// Everything here has internal linkage (an unnamed namespace): each kernel file gets its
// own AVX2/default clones of the hot loops, so no clone resolver is shared across files.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <vector>

#include "agkd/cpu/vectorize.h"
#include "agkd/hybrid.h"
#include "agkd/math/hybrid.h"
#include "agkd/math/ssim.h"

namespace agkd {
namespace {

// Rows per work item. Fixed (not derived from the thread count) so that partial sums,
// and therefore results, are bitwise identical on any machine with the same ISA.
constexpr int64_t kRowTile = 64;

// One (N, C, H, W) tensor of any strides, read plane by plane.
template <typename scalar_t>
struct StridedMaps {
  const scalar_t* data;
  int64_t sN, sC, sH, sW;
  explicit StridedMaps(const at::Tensor& t)
      : data(t.const_data_ptr<scalar_t>()),
        sN(t.stride(0)), sC(t.stride(1)), sH(t.stride(2)), sW(t.stride(3)) {}
  // One plane as a 1-plane map (the attention-alignment kernels run the tiles per plane).
  explicit StridedMaps(const scalar_t* plane, int64_t row_stride, int64_t col_stride)
      : data(plane), sN(0), sC(0), sH(row_stride), sW(col_stride) {}
  struct Plane {
    const scalar_t* data;
    int64_t sH, sW;
    const scalar_t* row(int64_t h) const { return data + h * sH; }
  };
  Plane plane(int64_t n, int64_t c) const { return {data + n * sN + c * sC, sH, sW}; }
};

// Source row `row` (stride sW) widened to acc_t into out[0, W + 2*pad), padded as the
// contract says. out[jp] holds padded column jp - pad.
template <typename scalar_t, typename acc_t>
AGKD_CPU_INLINE void load_padded_row(const scalar_t* row, int64_t sW, const PlaneGeometry& g,
                            acc_t* out) {
  const int64_t pad = g.pad, W = g.W;
  if (sW == 1) {
    for (int64_t j = 0; j < W; ++j) out[pad + j] = static_cast<acc_t>(row[j]);
  } else {
    for (int64_t j = 0; j < W; ++j) out[pad + j] = static_cast<acc_t>(row[j * sW]);
  }
  for (int64_t j = -pad; j < 0; ++j) {
    const int64_t s = source_index(j, W, g.padding);
    out[pad + j] = s < 0 ? acc_t(0) : out[pad + s];
  }
  for (int64_t j = W; j < W + pad; ++j) {
    const int64_t s = source_index(j, W, g.padding);
    out[pad + j] = s < 0 ? acc_t(0) : out[pad + s];
  }
}

// Output columns processed together: two AVX2 vectors per moment, so the five (forward)
// or four (backward) accumulators of a block stay in registers across the window's taps.
template <typename acc_t>
constexpr int64_t kBlock = 64 / sizeof(acc_t);

template <typename acc_t>
inline int64_t round_up_to_block(int64_t n) {
  return (n + kBlock<acc_t> - 1) / kBlock<acc_t> * kBlock<acc_t>;
}

// Per-thread buffers. Rows are whole blocks long; the slack past the live columns stays
// zero, so block loops may run over it without reading garbage.
template <typename acc_t>
struct Scratch {
  int64_t stride;                 // acc_t per ring/moment row: Wo rounded up to a block
  std::vector<acc_t> xrow, yrow;  // padded input rows (stride + window)
  std::vector<acc_t> ring;        // window x 5 horizontally blurred rows
  explicit Scratch(const PlaneGeometry& g)
      : stride(round_up_to_block<acc_t>(g.Wo)),
        xrow(stride + g.window, acc_t(0)), yrow(stride + g.window, acc_t(0)),
        ring(g.window * 5 * stride, acc_t(0)) {}
  acc_t* ring_row(int64_t padded_row, int64_t window) {
    // padded_row may be negative (reflect/zeros border): keep the slot non-negative.
    const int64_t slot = ((padded_row % window) + window) % window;
    return ring.data() + slot * 5 * stride;
  }
};

// Horizontal blur of one padded row pair: out[m * stride + j] for the five moments
// x, y, x², y², xy at output columns j in [0, stride) (columns past Wo read zeros).
template <typename acc_t>
AGKD_CPU_INLINE void blur_row(const acc_t* __restrict xp, const acc_t* __restrict yp,
                     const acc_t* __restrict taps, int64_t window, int64_t stride,
                     acc_t* __restrict out) {
  constexpr int64_t B = kBlock<acc_t>;
  for (int64_t j0 = 0; j0 < stride; j0 += B) {
    acc_t hx[B] = {}, hy[B] = {}, hxx[B] = {}, hyy[B] = {}, hxy[B] = {};
    for (int64_t k = 0; k < window; ++k) {
      const acc_t t = taps[k];
      const acc_t* __restrict xk = xp + j0 + k;
      const acc_t* __restrict yk = yp + j0 + k;
      AGKD_SIMD
      for (int64_t j = 0; j < B; ++j) {
        const acc_t a = xk[j], b = yk[j];
        const acc_t ta = t * a, tb = t * b;
        hx[j] += ta;
        hy[j] += tb;
        hxx[j] += ta * a;
        hyy[j] += tb * b;
        hxy[j] += ta * b;
      }
    }
    AGKD_SIMD
    for (int64_t j = 0; j < B; ++j) {
      out[j0 + j] = hx[j];
      out[stride + j0 + j] = hy[j];
      out[2 * stride + j0 + j] = hxx[j];
      out[3 * stride + j0 + j] = hyy[j];
      out[4 * stride + j0 + j] = hxy[j];
    }
  }
}

// Fills the ring slot of padded row p (source row source_index(p)) with its blurred row.
template <typename scalar_t, typename acc_t>
AGKD_CPU_INLINE void ring_push(const typename StridedMaps<scalar_t>::Plane& xp,
                               const typename StridedMaps<scalar_t>::Plane& yp,
                               const PlaneGeometry& g, const acc_t* taps, int64_t p,
                               Scratch<acc_t>& s) {
  acc_t* slot = s.ring_row(p, g.window);
  const int64_t src = source_index(p, g.H, g.padding);
  if (src < 0) {  // zero padding: the whole row is zero
    std::fill(slot, slot + 5 * s.stride, acc_t(0));
    return;
  }
  load_padded_row(xp.row(src), xp.sW, g, s.xrow.data());
  load_padded_row(yp.row(src), yp.sW, g, s.yrow.data());
  blur_row(s.xrow.data(), s.yrow.data(), taps, g.window, s.stride, slot);
}

// Calls fn(o, j0, moments) for each output row o in [o_begin, o_end) and each block of
// columns j0: moments[m][j] (m: x, y, x², y², xy) is the vertical blur of the ring for
// output columns j0 + j. Input rows stream through the ring: each is read and blurred once.
template <typename scalar_t, typename acc_t, typename Fn>
AGKD_CPU_INLINE void for_each_moment_block(const typename StridedMaps<scalar_t>::Plane& xp,
                                           const typename StridedMaps<scalar_t>::Plane& yp,
                                           const PlaneGeometry& g, const acc_t* taps,
                                  int64_t o_begin, int64_t o_end, Scratch<acc_t>& s, Fn&& fn) {
  constexpr int64_t B = kBlock<acc_t>;
  if (o_begin >= o_end) return;
  for (int64_t p = o_begin - g.pad; p < o_begin - g.pad + g.window - 1; ++p) {
    ring_push<scalar_t>(xp, yp, g, taps, p, s);
  }
  for (int64_t o = o_begin; o < o_end; ++o) {
    ring_push<scalar_t>(xp, yp, g, taps, o - g.pad + g.window - 1, s);
    for (int64_t j0 = 0; j0 < s.stride; j0 += B) {
      acc_t m[5][B] = {};
      for (int64_t k = 0; k < g.window; ++k) {
        const acc_t t = taps[k];
        const acc_t* __restrict row = s.ring_row(o - g.pad + k, g.window) + j0;
        for (int mi = 0; mi < 5; ++mi) {
          AGKD_SIMD
          for (int64_t j = 0; j < B; ++j) m[mi][j] += t * row[mi * s.stride + j];
        }
      }
      fn(o, j0, m);
    }
  }
}

template <typename acc_t, int64_t B>
AGKD_CPU_INLINE Moments<acc_t> moments_at(const acc_t (&m)[5][B], int64_t j) {
  return {m[0][j], m[1][j], m[2][j], m[3][j], m[4][j]};
}


// ---------------------------------------------------------------------------- forward

template <typename scalar_t, bool kSSIM, bool kCos>
AGKD_CPU_MULTIVERSION void hybrid_fwd_tiles(const StridedMaps<scalar_t>& xs,
                                            const StridedMaps<scalar_t>& ys,
                                            const PlaneGeometry& g, const HybridParams& p,
                                            const std::vector<at::opmath_type<scalar_t>>& taps,
                                            int64_t n_tiles, int64_t begin, int64_t end,
                                            HybridSums* sums) {
  using acc_t = at::opmath_type<scalar_t>;
  Scratch<acc_t> s(g);
  const acc_t c1 = static_cast<acc_t>(p.c1), c2 = static_cast<acc_t>(p.c2);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t plane = item / n_tiles, tile = item % n_tiles;
    const int64_t n = plane / g.C, c = plane % g.C;
    const auto xplane = xs.plane(n, c);
    const auto yplane = ys.plane(n, c);
    HybridSums out;
    if constexpr (kSSIM) {
      const int64_t o_begin = tile * kRowTile, o_end = std::min(o_begin + kRowTile, g.Ho);
      constexpr int64_t B = kBlock<acc_t>;
      acc_t lane_sums[B] = {};
      for_each_moment_block<scalar_t>(xplane, yplane, g, taps.data(), o_begin, o_end, s,
                            [&](int64_t, int64_t j0, const acc_t(&m)[5][B]) {
                              const int64_t live = std::min(B, g.Wo - j0);
                              AGKD_SIMD
                              for (int64_t j = 0; j < B; ++j) {
                                const acc_t v = ssim_from_moments(moments_at(m, j), c1, c2);
                                lane_sums[j] += j < live ? v : acc_t(0);
                              }
                              if (j0 + B >= s.stride) {  // end of the row: flush to double
                                for (int64_t j = 0; j < B; ++j) out.ssim += lane_sums[j];
                                std::fill(lane_sums, lane_sums + B, acc_t(0));
                              }
                            });
    }
    if constexpr (kCos) {
      const int64_t q_end = std::min((tile + 1) * kRowTile, g.H);
      for (int64_t q = tile * kRowTile; q < q_end; ++q) {
        const scalar_t* xr = xplane.row(q);
        const scalar_t* yr = yplane.row(q);
        acc_t dot = 0, xx = 0, yy = 0;
        for (int64_t j = 0; j < g.W; ++j) {
          const acc_t a = static_cast<acc_t>(xr[j * xs.sW]);
          const acc_t b = static_cast<acc_t>(yr[j * ys.sW]);
          dot += a * b;
          xx += a * a;
          yy += b * b;
        }
        out.dot += dot, out.xx += xx, out.yy += yy;
      }
    }
    sums[item] = out;
  }
}

// --------------------------------------------------------------------------- backward

// Per-thread buffers of the backward, on top of the forward's ring.
template <typename acc_t>
struct BackwardScratch {
  std::vector<acc_t> coeffs;  // 4 x rows x stride: d_mx, d_my, d_e2, d_exy per output pixel
  std::vector<acc_t> vert;    // 4 x vert_stride: vertical gather, led by window - 1 zeros
  std::vector<acc_t> folded;  // 4 x fold_stride: horizontal gather on padded columns
  int64_t vert_stride, fold_stride;
  // Block loops over the padded width (Wo + w - 1, rounded up) read and write up to
  // two blocks past stride + w; the slack is sized for that and stays zero.
  BackwardScratch(const PlaneGeometry& g, int64_t stride)
      : coeffs(4 * (kRowTile + g.window - 1) * stride, acc_t(0)),
        vert_stride(2 * g.window + stride + 2 * kBlock<acc_t>),
        fold_stride(g.window + stride + 2 * kBlock<acc_t>) {
    vert.assign(4 * vert_stride, acc_t(0));
    folded.assign(4 * fold_stride, acc_t(0));
  }
};

template <typename scalar_t, bool kSSIM, bool kCos>
AGKD_CPU_MULTIVERSION void hybrid_bwd_tiles(
    const StridedMaps<scalar_t>& xs, const StridedMaps<scalar_t>& ys, const PlaneGeometry& g,
    const HybridParams& p, const std::vector<at::opmath_type<scalar_t>>& taps,
    const at::opmath_type<scalar_t>* grad_loss, const at::opmath_type<scalar_t>* stats,
    scalar_t* grad_x, scalar_t* grad_y, int64_t n_tiles, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  Scratch<acc_t> s(g);
  BackwardScratch<acc_t> b(g, s.stride);
  const acc_t c1 = static_cast<acc_t>(p.c1), c2 = static_cast<acc_t>(p.c2);
  const int64_t stride = s.stride, w = g.window, pad = g.pad;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t plane = item / n_tiles, tile = item % n_tiles;
    const int64_t n = plane / g.C, c = plane % g.C;
    const auto xplane = xs.plane(n, c);
    const auto yplane = ys.plane(n, c);
    const int64_t q_begin = tile * kRowTile, q_end = std::min(q_begin + kRowTile, g.H);
    const acc_t g_n = grad_loss[n];

    CosineGrad<acc_t> cg{0, 0, 0};
    if constexpr (kCos) {
      cg = hybrid_cosine_grad(stats + kHybridStats * n, p.beta, p.eps, g_n);
    }
    // Output rows whose windows reach source rows [q_begin, q_end), reflect mirrors
    // included (mirrors of a border row stay within `pad` rows of that border).
    const int64_t o_begin = std::max<int64_t>(0, q_begin + pad - w + 1);
    const int64_t o_end = std::min<int64_t>(g.Ho, q_end + pad);
    if constexpr (kSSIM) {
      constexpr int64_t B = kBlock<acc_t>;
      const acc_t scale =
          static_cast<acc_t>(-p.alpha / static_cast<double>(g.ssim_count())) * g_n;
      const int64_t rows = o_end - o_begin;
      acc_t* coeffs = b.coeffs.data();
      for_each_moment_block<scalar_t>(
          xplane, yplane, g, taps.data(), o_begin, o_end, s,
          [&](int64_t o, int64_t j0, const acc_t(&m)[5][B]) {
            acc_t d_mx[B], d_my[B], d_e2[B], d_exy[B];
            const int64_t live = std::min(B, g.Wo - j0);
            AGKD_SIMD
            for (int64_t j = 0; j < B; ++j) {
              const MomentGrads<acc_t> d = ssim_moment_grads(moments_at(m, j), c1, c2, scale);
              const bool in = j < live;  // columns past Wo must contribute nothing
              d_mx[j] = in ? d.d_mx : acc_t(0);
              d_my[j] = in ? d.d_my : acc_t(0);
              d_e2[j] = in ? d.d_e2 : acc_t(0);
              d_exy[j] = in ? d.d_exy : acc_t(0);
            }
            acc_t* row = coeffs + (o - o_begin) * stride + j0;
            std::copy(d_mx, d_mx + B, row);
            std::copy(d_my, d_my + B, row + rows * stride);
            std::copy(d_e2, d_e2 + B, row + 2 * rows * stride);
            std::copy(d_exy, d_exy + B, row + 3 * rows * stride);
          });
    }
    for (int64_t q = q_begin; q < q_end; ++q) {
      const scalar_t* xr = xplane.row(q);
      const scalar_t* yr = yplane.row(q);
      const acc_t* fx = nullptr;  // transposed-blurred coefficients on padded columns
      int64_t fstride = 0;
      if constexpr (kSSIM) {
        constexpr int64_t B = kBlock<acc_t>;
        const int64_t rows = o_end - o_begin;
        const int64_t vs = b.vert_stride, lead = w - 1;
        // Vertical transposed blur: every padded row p that reads source row q (q itself
        // and its reflect mirrors) gathers taps[k] * coeffs[p - k + pad].
        int64_t readers[3] = {q, 0, 0};
        const int n_readers = 1 + mirror_indices(q, g.H, pad, g.padding, readers + 1);
        for (int64_t j0 = 0; j0 < stride; j0 += B) {
          acc_t v[4][B] = {};
          for (int r = 0; r < n_readers; ++r) {
            for (int64_t k = 0; k < w; ++k) {
              const int64_t o = readers[r] - k + pad;
              if (o < o_begin || o >= o_end) continue;
              const acc_t t = taps[k];
              const acc_t* __restrict src = b.coeffs.data() + (o - o_begin) * stride + j0;
              for (int mi = 0; mi < 4; ++mi) {
                AGKD_SIMD
                for (int64_t j = 0; j < B; ++j) v[mi][j] += t * src[mi * rows * stride + j];
              }
            }
          }
          for (int mi = 0; mi < 4; ++mi) {
            std::copy(v[mi], v[mi] + B, b.vert.data() + mi * vs + lead + j0);
          }
        }
        // Horizontal transposed blur as a gather: padded column jp collects
        // taps[l] * vert[jp - l], read from the zero-led buffer at lead + jp - l.
        const int64_t fs = b.fold_stride;
        for (int64_t j0 = 0; j0 < g.padded_width(); j0 += B) {
          acc_t h[4][B] = {};
          for (int64_t l = 0; l < w; ++l) {
            const acc_t t = taps[l];
            for (int mi = 0; mi < 4; ++mi) {
              const acc_t* __restrict src = b.vert.data() + mi * vs + lead + j0 - l;
              AGKD_SIMD
              for (int64_t j = 0; j < B; ++j) h[mi][j] += t * src[j];
            }
          }
          for (int mi = 0; mi < 4; ++mi) {
            std::copy(h[mi], h[mi] + B, b.folded.data() + mi * fs + j0);
          }
        }
        // Fold reflect mirrors onto their source columns (in place, mirrors first read).
        if (g.padding == Padding::kReflect) {
          for (int mi = 0; mi < 4; ++mi) {
            acc_t* hm = b.folded.data() + mi * fs;
            for (int64_t j = 1; j <= pad; ++j) hm[j + pad] += hm[pad - j];
            for (int64_t j = std::max<int64_t>(0, g.W - 1 - pad); j <= g.W - 2; ++j) {
              hm[j + pad] += hm[2 * (g.W - 1) - j + pad];
            }
          }
        }
        fx = b.folded.data() + pad;  // fx[m * fstride + j]: source column j
        fstride = fs;
      }
      scalar_t* gx = grad_x ? grad_x + (plane * g.H + q) * g.W : nullptr;
      scalar_t* gy = grad_y ? grad_y + (plane * g.H + q) * g.W : nullptr;
      for (int64_t j = 0; j < g.W; ++j) {
        const acc_t a = static_cast<acc_t>(xr[j * xs.sW]);
        const acc_t bv = static_cast<acc_t>(yr[j * ys.sW]);
        acc_t da = 0, db = 0;
        if constexpr (kSSIM) {
          const acc_t d_mx = fx[j], d_my = fx[fstride + j];
          const acc_t d_e2 = fx[2 * fstride + j], d_exy = fx[3 * fstride + j];
          da = ssim_pixel_grad(d_mx, d_e2, d_exy, a, bv);
          db = ssim_pixel_grad(d_my, d_e2, d_exy, bv, a);
        }
        if constexpr (kCos) {
          da += cg.coupling * bv - cg.self_x * a;
          db += cg.coupling * a - cg.self_y * bv;
        }
        if (gx) gx[j] = static_cast<scalar_t>(da);
        if (gy) gy[j] = static_cast<scalar_t>(db);
      }
    }
  }
}

// Row tiles (work items) per plane.
inline int64_t row_tiles(const PlaneGeometry& g) { return (g.H + kRowTile - 1) / kRowTile; }

}  // namespace
}  // namespace agkd
