// CUDA kernels of agkd::hybrid_fwd / agkd::hybrid_bwd (fused SSIM + cosine).
//
// Forward: one 16x16 block per output tile of one (n, c) plane. The block stages the tile
// plus its halo of x and y in shared memory (padding applied while loading), blurs it
// horizontally into five moment rows, then each thread blurs vertically and evaluates
// SSIM (math/ssim.h). Cosine sums use the same staged pixels. Each block writes its four
// partial sums to its own slot; a second kernel adds a sample's slots in a fixed order.
// No atomics anywhere, so results are bitwise repeatable.
//
// Backward: kernel 1 recomputes the moments per output tile and writes scale * dS/dmoment
// (four maps) to a scratch buffer; kernel 2 gathers them per source tile with the
// transposed window (reflect mirrors folded in) and writes both gradients.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "agkd/cuda/block_reduce.cuh"
#include "agkd/cuda/hybrid_cuda.h"
#include "agkd/cuda/launch.cuh"
#include "agkd/hybrid.h"
#include "agkd/math/cosine.h"
#include "agkd/math/hybrid.h"
#include "agkd/math/ssim.h"
#include "agkd/ops.h"

namespace agkd {
namespace {

constexpr int kTile = 16;                   // tile edge; one thread per tile pixel
constexpr int kThreads = kTile * kTile;
constexpr int kMaxTaps = 127;               // taps travel in the kernel's parameters
constexpr int kCosineBlocksPerSample = 32;  // fixed, so the summation order is too

// Everything a kernel needs to know about the maps and the window, passed by value.
template <typename acc_t>
struct Args {
  int64_t N, C, H, W, Ho, Wo, pad;
  int window;
  Padding padding;
  int64_t x_strides[4], y_strides[4];
  acc_t c1, c2;
  acc_t taps[kMaxTaps];
};

template <typename acc_t>
Args<acc_t> make_args(const at::Tensor& x, const at::Tensor& y, const PlaneGeometry& g,
                      const HybridParams& p) {
  TORCH_CHECK(g.window <= kMaxTaps, "agkd::hybrid (CUDA): window_size must be <= ", std::to_string(kMaxTaps),
              ", got ", std::to_string(g.window));
  Args<acc_t> a{};
  a.N = g.N, a.C = g.C, a.H = g.H, a.W = g.W, a.Ho = g.Ho, a.Wo = g.Wo, a.pad = g.pad;
  a.window = static_cast<int>(g.window);
  a.padding = g.padding;
  for (int d = 0; d < 4; ++d) a.x_strides[d] = x.stride(d), a.y_strides[d] = y.stride(d);
  a.c1 = static_cast<acc_t>(p.c1), a.c2 = static_cast<acc_t>(p.c2);
  const std::vector<acc_t> taps = gaussian_taps<acc_t>(g.window, p.sigma);
  std::copy(taps.begin(), taps.end(), a.taps);
  return a;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t load(const scalar_t* data, const int64_t* s, int64_t n,
                                      int64_t c, int64_t h, int64_t w) {
  return static_cast<acc_t>(data[n * s[0] + c * s[1] + h * s[2] + w * s[3]]);
}

// Padded-domain pixel (p_row, p_col) of one plane, or 0 where nothing is read.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t load_padded(const scalar_t* data, const int64_t* s,
                                             const Args<acc_t>& a, int64_t n, int64_t c,
                                             int64_t p_row, int64_t p_col) {
  const int64_t r = source_index(p_row, a.H, a.padding);
  const int64_t q = source_index(p_col, a.W, a.padding);
  // Tiles past the map's end reach beyond one reflection; those pixels feed only
  // outputs that are discarded, so 0 is as good as anything and never out of bounds.
  if (r < 0 || r >= a.H || q < 0 || q >= a.W) return acc_t(0);
  return load<scalar_t, acc_t>(data, s, n, c, r, q);
}

template <typename T>
__device__ __forceinline__ T block_sum(T v, T* shared) {  // shared: kThreads values
  return block_reduce(v, shared, SumOp{});
}

// Stages the (kTile + w - 1)^2 halo tile of x and y whose output tile starts at
// (o_row0, o_col0), and computes the five moments of this thread's output pixel.
// Shared memory: 2 * R * R (raw) + 5 * R * kTile (horizontal) acc_t, R = kTile + w - 1.
template <typename scalar_t, typename acc_t>
__device__ Moments<acc_t> tile_moments(const scalar_t* x, const scalar_t* y,
                                       const Args<acc_t>& a, int64_t n, int64_t c,
                                       int64_t o_row0, int64_t o_col0, acc_t* smem) {
  const int R = kTile + a.window - 1;
  const int tid = threadIdx.y * kTile + threadIdx.x;
  acc_t* raw_x = smem;
  acc_t* raw_y = raw_x + R * R;
  acc_t* horiz = raw_y + R * R;  // [5][R][kTile]
  for (int i = tid; i < R * R; i += kThreads) {
    const int r = i / R, q = i % R;
    raw_x[i] = load_padded(x, a.x_strides, a, n, c, o_row0 - a.pad + r, o_col0 - a.pad + q);
    raw_y[i] = load_padded(y, a.y_strides, a, n, c, o_row0 - a.pad + r, o_col0 - a.pad + q);
  }
  __syncthreads();
  for (int i = tid; i < R * kTile; i += kThreads) {
    const int r = i / kTile, q = i % kTile;
    acc_t hx = 0, hy = 0, hxx = 0, hyy = 0, hxy = 0;
    for (int k = 0; k < a.window; ++k) {
      const acc_t t = a.taps[k];
      const acc_t u = raw_x[r * R + q + k], v = raw_y[r * R + q + k];
      hx += t * u, hy += t * v, hxx += t * u * u, hyy += t * v * v, hxy += t * u * v;
    }
    const int plane = R * kTile;
    horiz[i] = hx, horiz[plane + i] = hy, horiz[2 * plane + i] = hxx;
    horiz[3 * plane + i] = hyy, horiz[4 * plane + i] = hxy;
  }
  __syncthreads();
  Moments<acc_t> m{0, 0, 0, 0, 0};
  const int plane = R * kTile;
  for (int k = 0; k < a.window; ++k) {
    const acc_t t = a.taps[k];
    const int i = (threadIdx.y + k) * kTile + threadIdx.x;
    m.mx += t * horiz[i], m.my += t * horiz[plane + i], m.exx += t * horiz[2 * plane + i];
    m.eyy += t * horiz[3 * plane + i], m.exy += t * horiz[4 * plane + i];
  }
  return m;
}

// Tiles cover the source map (H x W), which contains the output map (Ho x Wo).
struct TileGrid {
  int64_t rows, cols;
  __host__ __device__ int64_t per_plane() const { return rows * cols; }
};

// The tile this block works on: one block per (plane, tile), planes n-major.
struct BlockTile {
  int64_t plane, n, c;  // plane = n * C + c
  int64_t row0, col0;   // the tile's first row and column
};

__device__ __forceinline__ BlockTile block_tile(const TileGrid& grid, int64_t channels) {
  const int64_t item = blockIdx.x;
  const int64_t plane = item / grid.per_plane(), tile = item % grid.per_plane();
  return {plane, plane / channels, plane % channels, (tile / grid.cols) * kTile, (tile % grid.cols) * kTile};
}

// ---------------------------------------------------------------------------- forward

template <typename scalar_t, typename acc_t, bool kCos>
__global__ void __launch_bounds__(kThreads)
    hybrid_fwd_tiles_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                            const Args<acc_t> a, const TileGrid grid,
                            acc_t* __restrict__ partials) {
  acc_t* smem = dynamic_shared_memory<acc_t>();
  const auto [plane, n, c, row0, col0] = block_tile(grid, a.C);
  const int64_t row = row0 + threadIdx.y, col = col0 + threadIdx.x;

  const Moments<acc_t> m = tile_moments(x, y, a, n, c, row0, col0, smem);
  acc_t ssim = 0, dot = 0, xx = 0, yy = 0;
  if (row < a.Ho && col < a.Wo) ssim = ssim_from_moments(m, a.c1, a.c2);
  if (kCos && row < a.H && col < a.W) {
    // This thread's own source pixel sits at (ty + pad, tx + pad) of the staged tile.
    const int R = kTile + a.window - 1;
    const int i = (threadIdx.y + a.pad) * R + threadIdx.x + a.pad;
    const acc_t u = smem[i], v = smem[R * R + i];
    dot = u * v, xx = u * u, yy = v * v;
  }
  __syncthreads();  // the staged tile is reused as reduction scratch below
  acc_t* out = partials + int64_t(blockIdx.x) * 4;
  const acc_t s0 = block_sum(ssim, smem);
  const acc_t s1 = kCos ? block_sum(dot, smem) : acc_t(0);
  const acc_t s2 = kCos ? block_sum(xx, smem) : acc_t(0);
  const acc_t s3 = kCos ? block_sum(yy, smem) : acc_t(0);
  if (threadIdx.x == 0 && threadIdx.y == 0) out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

// Cosine only: the sample is a flat sequence; each of a fixed number of blocks sums a
// fixed chunk of it.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    cosine_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                      const Args<acc_t> a, acc_t* __restrict__ partials) {
  __shared__ acc_t scratch[kThreads];
  const int64_t n = blockIdx.y;
  const int64_t per_sample = a.C * a.H * a.W;
  const int64_t chunk = (per_sample + kCosineBlocksPerSample - 1) / kCosineBlocksPerSample;
  const int64_t begin = blockIdx.x * chunk;
  const int64_t end = begin + chunk < per_sample ? begin + chunk : per_sample;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  acc_t dot = 0, xx = 0, yy = 0;
  for (int64_t i = begin + tid; i < end; i += kThreads) {
    const int64_t c = i / (a.H * a.W), h = (i / a.W) % a.H, w = i % a.W;
    const acc_t u = load<scalar_t, acc_t>(x, a.x_strides, n, c, h, w);
    const acc_t v = load<scalar_t, acc_t>(y, a.y_strides, n, c, h, w);
    dot += u * v, xx += u * u, yy += v * v;
  }
  acc_t* out = partials + (n * kCosineBlocksPerSample + blockIdx.x) * 4;
  const acc_t s1 = block_sum(dot, scratch);
  const acc_t s2 = block_sum(xx, scratch);
  const acc_t s3 = block_sum(yy, scratch);
  if (tid == 0) out[0] = 0, out[1] = s1, out[2] = s2, out[3] = s3;
}

// One block per sample: adds its partial slots in a fixed order (in double) and writes
// the per-sample loss and cosine statistics.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    hybrid_finalize_kernel(const acc_t* __restrict__ partials, int64_t slots_per_sample,
                           double alpha, double beta, double eps, double ssim_count,
                           acc_t* __restrict__ loss, acc_t* __restrict__ stats) {
  __shared__ double scratch[kThreads];
  const int64_t n = blockIdx.x;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  HybridSums part;
  for (int64_t i = tid; i < slots_per_sample; i += kThreads) {
    const acc_t* slot = partials + (n * slots_per_sample + i) * 4;
    part += HybridSums{slot[0], slot[1], slot[2], slot[3]};
  }
  const HybridSums total{block_sum(part.ssim, scratch), block_sum(part.dot, scratch),
                         block_sum(part.xx, scratch), block_sum(part.yy, scratch)};
  if (tid == 0) {
    finish_hybrid_sample(total, alpha, beta, eps, ssim_count, 0.0, loss + n,
                         stats + n * kHybridStats);
  }
}

template <typename acc_t>
size_t forward_smem_bytes(int window) {
  const size_t R = kTile + window - 1;
  return (2 * R * R + 5 * R * kTile) * sizeof(acc_t);
}

template <typename acc_t>
size_t backward_smem_bytes(int window) {
  const size_t R = kTile + window - 1;
  return (4 * R * R + 4 * R * kTile) * sizeof(acc_t);
}

// Allows `bytes` of dynamic shared memory for `kernel`, or explains why it cannot.
template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes, int64_t window) {
  int device = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  // Numbers go through std::to_string, not the stream: streaming an integer here segfaulted
  // on a GPU build that linked libstdc++ statically (docs/design.md, section 7).
  TORCH_CHECK(bytes <= static_cast<size_t>(optin),
              "agkd::hybrid (CUDA): window_size " + std::to_string(window) + " needs " +
                  std::to_string(bytes) + " bytes of shared memory per block, the device allows " +
                  std::to_string(optin) + "; use a smaller window_size");
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
}

template <typename scalar_t>
void hybrid_fwd_launch(const at::Tensor& x, const at::Tensor& y, const PlaneGeometry& g,
                       const HybridParams& p, at::Tensor& loss, at::Tensor& stats) {
  using acc_t = at::opmath_type<scalar_t>;
  const Args<acc_t> a = make_args<acc_t>(x, y, g, p);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 block(kTile, kTile);
  int64_t slots = 0;
  at::Tensor partials;
  dispatch_terms</*kAllowNone=*/true>(p.alpha != 0, p.beta != 0, [&]<bool kSSIM, bool kCos>() {
    if constexpr (kSSIM) {
      const TileGrid grid{(g.H + kTile - 1) / kTile, (g.W + kTile - 1) / kTile};
      const int64_t blocks = g.N * g.C * grid.per_plane();
      TORCH_CHECK(blocks < (int64_t{1} << 31), "agkd::hybrid (CUDA): input too large");
      slots = g.C * grid.per_plane();
      partials = at::empty({blocks * 4}, x.options().dtype(loss.scalar_type()));
      const size_t bytes = forward_smem_bytes<acc_t>(a.window);
      auto kernel = hybrid_fwd_tiles_kernel<scalar_t, acc_t, kCos>;
      allow_shared_memory(kernel, bytes, g.window);
      launch_kernel(kernel, blocks, block, bytes, stream, x.const_data_ptr<scalar_t>(),
                    y.const_data_ptr<scalar_t>(), a, grid, partials.mutable_data_ptr<acc_t>());
    } else {  // cosine only (or nothing: the finish then skips the zero-weight sums)
      TORCH_CHECK(g.N < 65536, "agkd::hybrid (CUDA): cosine-only supports N < 65536");
      slots = kCosineBlocksPerSample;
      partials = at::empty({g.N * slots * 4}, x.options().dtype(loss.scalar_type()));
      launch_kernel(cosine_fwd_kernel<scalar_t, acc_t>, dim3(kCosineBlocksPerSample, g.N), block,
                    0, stream, x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), a,
                    partials.mutable_data_ptr<acc_t>());
    }
  });
  launch_kernel(hybrid_finalize_kernel<acc_t>, g.N, block, 0, stream,
                partials.const_data_ptr<acc_t>(), slots, p.alpha, p.beta, p.eps,
                static_cast<double>(g.ssim_count()), loss.mutable_data_ptr<acc_t>(),
                stats.mutable_data_ptr<acc_t>());
}

// --------------------------------------------------------------------------- backward

// Kernel 1: scale_n * dS/dmoment at every output pixel -> coeffs[plane][4][Ho][Wo].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    ssim_coeffs_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                       const Args<acc_t> a, const TileGrid grid,
                       const acc_t* __restrict__ grad_loss, double ssim_scale,
                       acc_t* __restrict__ coeffs) {
  acc_t* smem = dynamic_shared_memory<acc_t>();
  const auto [plane, n, c, row0, col0] = block_tile(grid, a.C);
  const int64_t row = row0 + threadIdx.y, col = col0 + threadIdx.x;
  const Moments<acc_t> m = tile_moments(x, y, a, n, c, row0, col0, smem);
  if (row >= a.Ho || col >= a.Wo) return;
  const acc_t scale = static_cast<acc_t>(ssim_scale) * grad_loss[n];
  const MomentGrads<acc_t> d = ssim_moment_grads(m, a.c1, a.c2, scale);
  const int64_t map = a.Ho * a.Wo;
  acc_t* out = coeffs + plane * 4 * map + row * a.Wo + col;
  out[0] = d.d_mx, out[map] = d.d_my, out[2 * map] = d.d_e2, out[3 * map] = d.d_exy;
}

// Kernel 2: per source tile, gather the coefficient maps through the transposed window
// and write both gradients (plus the cosine term).
template <typename scalar_t, typename acc_t, bool kSSIM, bool kCos>
__global__ void __launch_bounds__(kThreads)
    hybrid_grad_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                       const Args<acc_t> a, const TileGrid grid,
                       const acc_t* __restrict__ coeffs, const acc_t* __restrict__ grad_loss,
                       const acc_t* __restrict__ stats, double beta, double eps,
                       scalar_t* __restrict__ grad_x, scalar_t* __restrict__ grad_y) {
  acc_t* smem = dynamic_shared_memory<acc_t>();
  const auto [plane, n, c, row0, col0] = block_tile(grid, a.C);
  const int64_t q_row = row0 + threadIdx.y, q_col = col0 + threadIdx.x;
  const int tid = threadIdx.y * kTile + threadIdx.x;

  acc_t f[4] = {0, 0, 0, 0};  // transposed-blurred coefficients at this source pixel
  if constexpr (kSSIM) {
    const int w = a.window;
    const int R = kTile + w - 1;
    // Output rows/cols whose windows reach this tile: [origin, origin + R).
    const int64_t o_row0 = row0 + a.pad - w + 1, o_col0 = col0 + a.pad - w + 1;
    acc_t* g = smem;              // [4][R][R]
    acc_t* vert = g + 4 * R * R;  // [4][kTile][R]
    const int64_t map = a.Ho * a.Wo;
    const acc_t* src = coeffs + plane * 4 * map;
    for (int i = tid; i < R * R; i += kThreads) {
      const int64_t o_row = o_row0 + i / R, o_col = o_col0 + i % R;
      const bool in = o_row >= 0 && o_row < a.Ho && o_col >= 0 && o_col < a.Wo;
      for (int m = 0; m < 4; ++m) g[m * R * R + i] = in ? src[m * map + o_row * a.Wo + o_col] : acc_t(0);
    }
    __syncthreads();
    // Vertical gather, folded over every padded row that reads source row q.
    for (int i = tid; i < kTile * R; i += kThreads) {
      const int r = i / R, col = i % R;
      const int64_t q = row0 + r;
      int64_t readers[3] = {q, 0, 0};
      const int n_readers = 1 + mirror_indices(q, a.H, a.pad, a.padding, readers + 1);
      acc_t v[4] = {0, 0, 0, 0};
      for (int j = 0; j < n_readers; ++j) {
        for (int k = 0; k < w; ++k) {
          const int64_t local = readers[j] - k + a.pad - o_row0;
          if (local < 0 || local >= R) continue;
          const acc_t t = a.taps[k];
          for (int m = 0; m < 4; ++m) v[m] += t * g[(m * R + local) * R + col];
        }
      }
      for (int m = 0; m < 4; ++m) vert[(m * kTile + r) * R + col] = v[m];
    }
    __syncthreads();
    // Horizontal gather for this thread's pixel, folded the same way over columns.
    int64_t readers[3] = {q_col, 0, 0};
    const int n_readers = 1 + mirror_indices(q_col, a.W, a.pad, a.padding, readers + 1);
    for (int j = 0; j < n_readers; ++j) {
      for (int l = 0; l < w; ++l) {
        const int64_t local = readers[j] - l + a.pad - o_col0;
        if (local < 0 || local >= R) continue;
        const acc_t t = a.taps[l];
        for (int m = 0; m < 4; ++m) f[m] += t * vert[(m * kTile + threadIdx.y) * R + local];
      }
    }
  }
  if (q_row >= a.H || q_col >= a.W) return;
  const acc_t u = load<scalar_t, acc_t>(x, a.x_strides, n, c, q_row, q_col);
  const acc_t v = load<scalar_t, acc_t>(y, a.y_strides, n, c, q_row, q_col);
  acc_t du = 0, dv = 0;
  if constexpr (kSSIM) {
    du = ssim_pixel_grad(f[0], f[2], f[3], u, v);
    dv = ssim_pixel_grad(f[1], f[2], f[3], v, u);
  }
  if constexpr (kCos) {
    const CosineGrad<acc_t> cg = hybrid_cosine_grad(stats + kHybridStats * n, beta, eps, grad_loss[n]);
    du += cg.coupling * v - cg.self_x * u;
    dv += cg.coupling * u - cg.self_y * v;
  }
  const int64_t out = (plane * a.H + q_row) * a.W + q_col;
  if (grad_x) grad_x[out] = static_cast<scalar_t>(du);
  if (grad_y) grad_y[out] = static_cast<scalar_t>(dv);
}

template <typename scalar_t>
void hybrid_bwd_launch(const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& y,
                       const at::Tensor& stats, const PlaneGeometry& g, const HybridParams& p,
                       at::Tensor& grad_x, at::Tensor& grad_y) {
  using acc_t = at::opmath_type<scalar_t>;
  const Args<acc_t> a = make_args<acc_t>(x, y, g, p);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 block(kTile, kTile);
  const TileGrid grid{(g.H + kTile - 1) / kTile, (g.W + kTile - 1) / kTile};
  const int64_t blocks = g.N * g.C * grid.per_plane();
  TORCH_CHECK(blocks < (int64_t{1} << 31), "agkd::hybrid (CUDA): input too large");
  scalar_t* gx = grad_x.numel() ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* gy = grad_y.numel() ? grad_y.mutable_data_ptr<scalar_t>() : nullptr;
  const acc_t* gl = grad_loss.const_data_ptr<acc_t>();
  const acc_t* st = stats.const_data_ptr<acc_t>();
  dispatch_terms</*kAllowNone=*/true>(p.alpha != 0, p.beta != 0, [&]<bool kSSIM, bool kCos>() {
    auto kernel = hybrid_grad_kernel<scalar_t, acc_t, kSSIM, kCos>;
    at::Tensor coeffs;
    size_t bytes = 0;
    if constexpr (kSSIM) {
      coeffs = at::empty({g.N * g.C * 4 * g.Ho * g.Wo}, grad_loss.options());
      const double ssim_scale = -p.alpha / static_cast<double>(g.ssim_count());
      auto coeff_kernel = ssim_coeffs_kernel<scalar_t, acc_t>;
      const size_t fwd_bytes = forward_smem_bytes<acc_t>(a.window);
      allow_shared_memory(coeff_kernel, fwd_bytes, g.window);
      launch_kernel(coeff_kernel, blocks, block, fwd_bytes, stream, x.const_data_ptr<scalar_t>(),
                    y.const_data_ptr<scalar_t>(), a, grid, gl, ssim_scale,
                    coeffs.mutable_data_ptr<acc_t>());
      bytes = backward_smem_bytes<acc_t>(a.window);
      allow_shared_memory(kernel, bytes, g.window);
    }
    launch_kernel(kernel, blocks, block, bytes, stream, x.const_data_ptr<scalar_t>(),
                  y.const_data_ptr<scalar_t>(), a, grid,
                  kSSIM ? coeffs.const_data_ptr<acc_t>() : nullptr, gl, st, p.beta, p.eps, gx, gy);
  });
}

}  // namespace

// Entry points, also called by the attention-alignment kernels (align_cuda.cu).
std::tuple<at::Tensor, at::Tensor> hybrid_fwd_cuda(const at::Tensor& x, const at::Tensor& y,
                                                   double alpha, double beta,
                                                   int64_t window_size, double sigma,
                                                   double c1, double c2,
                                                   c10::string_view padding, double eps,
                                                   c10::string_view reduction) {
  const HybridParams p = make_params(alpha, beta, window_size, sigma, c1, c2, padding, eps);
  const Reduction r = parse_reduction(reduction);
  const PlaneGeometry g = make_geometry(x, y, p);
  const c10::cuda::CUDAGuard guard(x.device());
  auto [loss, stats] = per_sample_outputs(x, g.N, kHybridStats);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hybrid_fwd_cuda",
                                  [&] { hybrid_fwd_launch<scalar_t>(x, y, g, p, loss, stats); });
  return {reduce_loss(loss, r), stats};
}

std::tuple<at::Tensor, at::Tensor> hybrid_bwd_cuda(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& y,
    const at::Tensor& stats, double alpha, double beta, int64_t window_size, double sigma,
    double c1, double c2, c10::string_view padding, double eps, bool needs_grad_x,
    bool needs_grad_y) {
  const HybridParams p = make_params(alpha, beta, window_size, sigma, c1, c2, padding, eps);
  const PlaneGeometry g = make_geometry(x, y, p);
  const c10::cuda::CUDAGuard guard(x.device());
  HybridBackward b = prepare_hybrid_backward(grad_loss, stats, x, y, g, needs_grad_x, needs_grad_y);
  if (b.needed) hybrid_bwd_cuda_into(b, x, y, g, p);
  return {b.grad_a, b.grad_b};
}

void hybrid_bwd_cuda_into(HybridBackward& b, const at::Tensor& x, const at::Tensor& y, const PlaneGeometry& g,
                          const HybridParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hybrid_bwd_cuda", [&] {
    hybrid_bwd_launch<scalar_t>(b.grad_loss, x, y, b.stats, g, p, b.grad_a, b.grad_b);
  });
}

TORCH_LIBRARY_IMPL(agkd, CUDA, m) {
  register_kernel<op::HybridFwd>(m, &hybrid_fwd_cuda);
  register_kernel<op::HybridBwd>(m, &hybrid_bwd_cuda);
}

}  // namespace agkd
