// TokenSelect: fp32 change scores, then a rank-based selection with no top-k size limit.
#include <cub/block/block_scan.cuh>

#include "common.cuh"

namespace ipcv {
namespace {

constexpr int kSelectThreads = 256;
constexpr int64_t kMaxTokens = 49152;  // kept flags live in 48 KiB of shared memory

// One warp per token: ||h_cur - h_prev||_2 in fp32; +inf for prefix tokens, -inf for NaN.
template <typename T>
__global__ void score_kernel(const T* h_prev, const T* h_cur, int64_t count, int64_t tokens,
                             int64_t width, int64_t num_prefix, float* scores) {
  const int64_t token = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (token >= count) return;
  const T* cur = h_cur + token * width;
  const T* prev = h_prev + token * width;
  float acc = 0.f;
  for (int64_t d = lane; d < width; d += kWarp) {
    const float diff = to_float(cur[d]) - to_float(prev[d]);
    acc += diff * diff;
  }
  acc = warp_sum(acc);
  if (lane == 0) {
    const float score = sqrtf(acc);
    scores[token] = (token % tokens) < num_prefix ? INFINITY : (isnan(score) ? -INFINITY : score);
  }
}

// One block per row. A token is kept when fewer than num_keep tokens outrank it (higher score,
// or equal score and lower index): a strict total order, so exactly num_keep are kept. Then
// both index lists are written in ascending order with a block-wide prefix sum.
__global__ void select_kernel(const float* scores, int64_t tokens, int64_t num_keep,
                              int64_t* keep_idx, int64_t* drop_idx) {
  extern __shared__ unsigned char kept[];
  using Scan = cub::BlockScan<int64_t, kSelectThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  const int64_t row = blockIdx.x;
  const float* s = scores + row * tokens;
  for (int64_t i = threadIdx.x; i < tokens; i += blockDim.x) {
    const float si = s[i];
    int64_t rank = 0;
    for (int64_t j = 0; j < tokens && rank < num_keep; ++j) {
      const float sj = s[j];
      rank += (sj > si) || (sj == si && j < i);
    }
    kept[i] = rank < num_keep;
  }
  __syncthreads();
  const int64_t chunk = (tokens + blockDim.x - 1) / blockDim.x;
  const int64_t begin = min(tokens, threadIdx.x * chunk);
  const int64_t end = min(tokens, begin + chunk);
  int64_t mine = 0;
  for (int64_t i = begin; i < end; ++i) mine += kept[i];
  int64_t kept_before = 0;
  Scan(scan_storage).ExclusiveSum(mine, kept_before);
  int64_t* keep_row = keep_idx + row * num_keep;
  int64_t* drop_row = drop_idx + row * (tokens - num_keep);
  int64_t k = kept_before;
  int64_t d = begin - kept_before;
  for (int64_t i = begin; i < end; ++i) {
    if (kept[i]) {
      keep_row[k++] = i;
    } else {
      drop_row[d++] = i;
    }
  }
}

}  // namespace
}  // namespace ipcv

extern "C" size_t ipcv_token_select_workspace(int64_t batch, int64_t tokens) {
  return static_cast<size_t>(batch * tokens) * sizeof(float);
}

extern "C" int ipcv_token_select(const void* h_prev, const void* h_cur, IpcvDType dtype,
                                 int64_t batch, int64_t tokens, int64_t width, int64_t num_keep,
                                 int64_t num_prefix, int64_t* keep_idx, int64_t* drop_idx,
                                 void* workspace, cudaStream_t stream) {
  using namespace ipcv;
  if (num_keep < 1 || num_keep > tokens || num_prefix < 0 || num_prefix > num_keep ||
      tokens > kMaxTokens || width < 1) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (batch == 0) return 0;
  auto* scores = static_cast<float*>(workspace);
  const int64_t count = batch * tokens;
  const int threads = 256;
  const int64_t blocks = (count * kWarp + threads - 1) / threads;
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    score_kernel<T><<<blocks, threads, 0, stream>>>(static_cast<const T*>(h_prev),
                                                    static_cast<const T*>(h_cur), count, tokens,
                                                    width, num_prefix, scores);
    return 0;
  });
  select_kernel<<<batch, kSelectThreads, tokens, stream>>>(scores, tokens, num_keep, keep_idx,
                                                           drop_idx);
  return static_cast<int>(cudaGetLastError());
}
