// NeighborReconstruct: kept tokens scattered back, pruned tokens rebuilt from their
// neighbours' drift (fp32 accumulation), all in original token order.
#include <algorithm>

#include "common.cuh"

namespace ipcv {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void scatter_kept(const T* x_keep, const int64_t* keep_idx, int64_t kept,
                             int64_t tokens, int64_t width, int64_t total, T* full) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = i % width;
    const int64_t bp = i / width;
    const int64_t b = bp / kept;
    full[(b * tokens + keep_idx[bp]) * width + d] = x_keep[i];
  }
}

template <typename T>
__global__ void rebuild_dropped(const T* x_keep, const T* x0_keep, const T* x0_drop,
                                const int64_t* nbr, const int64_t* drop_idx, int64_t kept,
                                int64_t dropped, int64_t tokens, int64_t width, int64_t k,
                                int64_t total, T* full) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = i % width;
    const int64_t br = i / width;
    const int64_t b = br / dropped;
    const int64_t* neighbours = nbr + br * k;
    float drift = 0.f;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t at = (b * kept + neighbours[j]) * width + d;
      drift += to_float(x_keep[at]) - to_float(x0_keep[at]);
    }
    const float value = to_float(x0_drop[i]) + drift / static_cast<float>(k);
    full[(b * tokens + drop_idx[br]) * width + d] = from_float<T>(value);
  }
}

int64_t blocks_for(int64_t total) {
  return std::min<int64_t>((total + kThreads - 1) / kThreads, 65535);
}

}  // namespace
}  // namespace ipcv

extern "C" int ipcv_neighbor_reconstruct(const void* x_keep, const void* x0_keep,
                                         const void* x0_drop, const int64_t* nbr,
                                         const int64_t* keep_idx, const int64_t* drop_idx,
                                         IpcvDType dtype, int64_t batch, int64_t kept,
                                         int64_t dropped, int64_t width, int64_t num_neighbors,
                                         void* full, cudaStream_t stream) {
  using namespace ipcv;
  if (kept < 1 || width < 1 || (dropped > 0 && num_neighbors < 1)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (batch == 0) return 0;
  const int64_t tokens = kept + dropped;
  const int64_t kept_total = batch * kept * width;
  const int64_t dropped_total = batch * dropped * width;
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    T* out = static_cast<T*>(full);
    scatter_kept<T><<<blocks_for(kept_total), kThreads, 0, stream>>>(
        static_cast<const T*>(x_keep), keep_idx, kept, tokens, width, kept_total, out);
    if (dropped_total > 0) {
      rebuild_dropped<T><<<blocks_for(dropped_total), kThreads, 0, stream>>>(
          static_cast<const T*>(x_keep), static_cast<const T*>(x0_keep),
          static_cast<const T*>(x0_drop), nbr, drop_idx, kept, dropped, tokens, width,
          num_neighbors, dropped_total, out);
    }
    return 0;
  });
  return static_cast<int>(cudaGetLastError());
}
