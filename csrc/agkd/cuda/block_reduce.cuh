// Fixed-order block reductions shared by the CUDA kernels: the same tree over shared
// memory every time, so results are bitwise repeatable (no atomics, no warp-order luck).
#pragma once

namespace agkd {

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

// Skips a NaN operand (b > a is false for it); callers let NaN reach the result through
// their sums instead.
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return b > a ? b : a; }
};

// The same for the minimum.
struct MinOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return b < a ? b : a; }
};

// Reduces one value per thread over the whole block (its size a power of two, at most
// the length of `shared`); every thread receives the result.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T value, T* shared, Op op) {
  const int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int count = blockDim.x * blockDim.y * blockDim.z;
  shared[tid] = value;
  __syncthreads();
  for (int half = count / 2; half > 0; half >>= 1) {
    if (tid < half) shared[tid] = op(shared[tid], shared[tid + half]);
    __syncthreads();
  }
  const T result = shared[0];
  __syncthreads();  // `shared` may be reused right away
  return result;
}

}  // namespace agkd
