// NeighborIndex: fp32 Euclidean kNN of each pruned token among the kept tokens of its row.
#include "common.cuh"

namespace ipcv {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kMaxShared = 12288;  // floats: the query row and its distances, 48 KiB

// One warp per kept token: squared norm in fp32.
template <typename T>
__global__ void norm_kernel(const T* x, int64_t count, int64_t width, float* norms) {
  const int64_t row = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= count) return;
  float acc = 0.f;
  for (int64_t d = lane; d < width; d += kWarp) {
    const float v = to_float(x[row * width + d]);
    acc += v * v;
  }
  acc = warp_sum(acc);
  if (lane == 0) norms[row] = acc;
}

__device__ __forceinline__ bool closer(float a, int64_t ia, float b, int64_t ib) {
  return a < b || (a == b && ia < ib);
}

// One block per pruned token: distances to every kept token of its row in shared memory,
// then k rounds of a block-wide arg-min (lower index on ties), nearest first.
template <typename T>
__global__ void knn_kernel(const T* x_keep, const T* x_drop, const float* keep_norms,
                           int64_t kept, int64_t dropped, int64_t width, int64_t k,
                           int64_t* nbr) {
  extern __shared__ float shared[];
  float* query = shared;
  float* dist = shared + width;
  __shared__ float warp_val[kThreads / kWarp];
  __shared__ int64_t warp_idx[kThreads / kWarp];
  __shared__ float query_norm;
  const int64_t row = blockIdx.x;  // b * dropped + r
  const int64_t b = row / dropped;
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;

  float part = 0.f;
  for (int64_t d = threadIdx.x; d < width; d += blockDim.x) {
    const float v = to_float(x_drop[row * width + d]);
    query[d] = v;
    part += v * v;
  }
  part = warp_sum(part);
  if (lane == 0) warp_val[warp] = part;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int w = 0; w < warps; ++w) total += warp_val[w];
    query_norm = total;
  }
  __syncthreads();

  const T* keys = x_keep + b * kept * width;
  for (int64_t p = warp; p < kept; p += warps) {
    float dot = 0.f;
    for (int64_t d = lane; d < width; d += kWarp) dot += query[d] * to_float(keys[p * width + d]);
    dot = warp_sum(dot);
    if (lane == 0) {
      const float value = query_norm + keep_norms[b * kept + p] - 2.f * dot;
      dist[p] = isnan(value) ? INFINITY : value;
    }
  }
  __syncthreads();

  for (int64_t j = 0; j < k; ++j) {
    float best = INFINITY;
    int64_t best_idx = kept;
    for (int64_t p = threadIdx.x; p < kept; p += blockDim.x) {
      if (closer(dist[p], p, best, best_idx)) {
        best = dist[p];
        best_idx = p;
      }
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float other = __shfl_xor_sync(0xffffffffu, best, offset);
      const int64_t other_idx = __shfl_xor_sync(0xffffffffu, best_idx, offset);
      if (closer(other, other_idx, best, best_idx)) {
        best = other;
        best_idx = other_idx;
      }
    }
    if (lane == 0) {
      warp_val[warp] = best;
      warp_idx[warp] = best_idx;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < warps; ++w) {
        if (closer(warp_val[w], warp_idx[w], best, best_idx)) {
          best = warp_val[w];
          best_idx = warp_idx[w];
        }
      }
      nbr[row * k + j] = best_idx;
      dist[best_idx] = __int_as_float(0x7f800001);  // NaN: never closer than anything
    }
    __syncthreads();
  }
}

}  // namespace
}  // namespace ipcv

extern "C" size_t ipcv_neighbor_index_workspace(int64_t batch, int64_t kept) {
  return static_cast<size_t>(batch * kept) * sizeof(float);
}

extern "C" int ipcv_neighbor_index(const void* x_keep, const void* x_drop, IpcvDType dtype,
                                   int64_t batch, int64_t kept, int64_t dropped, int64_t width,
                                   int64_t num_neighbors, int64_t* nbr, void* workspace,
                                   cudaStream_t stream) {
  using namespace ipcv;
  if (num_neighbors < 1 || num_neighbors > kept || kept + width > kMaxShared || width < 1) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (batch == 0 || dropped == 0) return 0;
  auto* norms = static_cast<float*>(workspace);
  const int64_t rows = batch * kept;
  const size_t shared = static_cast<size_t>(kept + width) * sizeof(float);
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    norm_kernel<T><<<(rows * kWarp + 255) / 256, 256, 0, stream>>>(static_cast<const T*>(x_keep),
                                                                   rows, width, norms);
    knn_kernel<T><<<batch * dropped, kThreads, shared, stream>>>(
        static_cast<const T*>(x_keep), static_cast<const T*>(x_drop), norms, kept, dropped, width,
        num_neighbors, nbr);
    return 0;
  });
  return static_cast<int>(cudaGetLastError());
}
