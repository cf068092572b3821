// Shared by the CPU (.cpp) and CUDA (.cu) kernels: everything in csrc/agkd/math is the
// per-element math written once. Loops and memory movement live in cpu/ and cuda/.
#pragma once

#include <cstdint>

// Forced inline on both sides: these run inside the kernels' per-element loops, where a
// call (or a helper compiled for the baseline ISA outside an AVX2 clone) stops vectorisation.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define AGKD_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define AGKD_HOST_DEVICE inline __attribute__((always_inline))
#else
#define AGKD_HOST_DEVICE inline
#endif

namespace agkd {

// How the window sees pixels outside the map (docs/design.md, section 3).
enum class Padding : int32_t {
  kValid = 0,    // no padding: output is (H - w + 1) x (W - w + 1)
  kReflect = 1,  // torch "reflect" (mirror without repeating the edge), output H x W
  kZeros = 2,    // zero padding, output H x W
};

// Border rows/columns that the window adds on each side for this padding.
AGKD_HOST_DEVICE int64_t pad_width(Padding padding, int64_t window_size) {
  return padding == Padding::kValid ? 0 : window_size / 2;
}

// Maps a padded-domain index p (source coordinates, p in [-pad, n - 1 + pad]) to the
// source index it reads, or -1 where zero padding supplies a 0. Reflect padding needs
// pad < n (make_geometry in hybrid.h checks it), so a single reflection always lands inside.
AGKD_HOST_DEVICE int64_t source_index(int64_t p, int64_t n, Padding padding) {
  if (p >= 0 && p < n) return p;
  if (padding != Padding::kReflect) return -1;
  return p < 0 ? -p : 2 * (n - 1) - p;
}

// The padded-domain indices other than q itself that read source index q
// (reflect only: -q near the start, 2(n-1)-q near the end). Returns how many (0..2).
AGKD_HOST_DEVICE int mirror_indices(int64_t q, int64_t n, int64_t pad, Padding padding,
                                    int64_t out[2]) {
  int count = 0;
  if (padding != Padding::kReflect) return 0;
  if (q >= 1 && q <= pad) out[count++] = -q;
  if (q <= n - 2 && q >= n - 1 - pad) out[count++] = 2 * (n - 1) - q;
  return count;
}

}  // namespace agkd
