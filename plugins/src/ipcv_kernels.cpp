// The C API of ipcv_kernels.h: argument checks, then the host launch sequences of the Triton
// kernels (documented in ipcv_deploy/kernels/token_select.py and neighbors.py), replayed on
// the embedded ahead-of-time images through the CUDA driver API.
#include "ipcv_kernels.h"

#include <cstdint>

#include "aot_launcher.h"

namespace ipcv {
namespace {

using namespace ipcv_aot;

constexpr int64_t kI32Limit = int64_t{1} << 31;  // the kernels use i32 offsets
constexpr int64_t kMaxGridY = 65535;

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool fits_i32(int64_t a, int64_t b, int64_t c) {
  // a * b * c < 2^31 for non-negative factors, without overflowing int64.
  if (a == 0 || b == 0 || c == 0) return true;
  return a < kI32Limit / b && a * b < kI32Limit / c;
}

int32_t i32(int64_t value) { return static_cast<int32_t>(value); }

bool valid_dtype(IpcvDType dtype) {
  return dtype == IPCV_FLOAT32 || dtype == IPCV_FLOAT16 || dtype == IPCV_BFLOAT16;
}

// The variant of a per-dtype kernel.
KernelId by_dtype(IpcvDType dtype, KernelId fp32, KernelId fp16, KernelId bf16) {
  return dtype == IPCV_FLOAT16 ? fp16 : (dtype == IPCV_BFLOAT16 ? bf16 : fp32);
}

// Radix passes of TokenSelect, most significant byte first.
constexpr int32_t kRadixShifts[] = {24, 16, 8, 0};

}  // namespace
}  // namespace ipcv

extern "C" IPCV_API size_t ipcv_token_select_workspace(int64_t batch, int64_t tokens) {
  using namespace ipcv;
  // keys [B, N] + hist [4, B, 256] + state [B, 4] + counts [B, T, 2], 4-byte words.
  const int64_t tiles = cdiv(tokens, ipcv_aot::ipcv_ts_hist_block_n);
  return static_cast<size_t>(4 * (batch * tokens + 1028 * batch + 2 * batch * tiles));
}

extern "C" IPCV_API int ipcv_token_select(const void* h_prev, const void* h_cur, IpcvDType dtype,
                                          int64_t batch, int64_t tokens, int64_t width,
                                          int64_t num_keep, int64_t num_prefix,
                                          int64_t* keep_idx, int64_t* drop_idx, void* workspace,
                                          void* stream) {
  using namespace ipcv;
  using namespace ipcv_aot;
  const int64_t key_block = ipcv_ts_keys_fp32_block_n;
  const int64_t block = ipcv_ts_hist_block_n;
  if (!valid_dtype(dtype) || batch < 0 || width < 1 || num_keep < 1 || num_keep > tokens ||
      num_prefix < 0 || num_prefix > num_keep || !fits_i32(batch, tokens, width) ||
      cdiv(tokens, key_block) > kMaxGridY) {
    return IPCV_ERROR_INVALID_VALUE;
  }
  if (batch == 0) return IPCV_SUCCESS;
  auto* ws = static_cast<int32_t*>(workspace);
  const int32_t b = i32(batch), n = i32(tokens);
  const int64_t tiles = cdiv(tokens, block);
  // With N == P nothing is dropped; the kernel still needs a valid pointer.
  int64_t* drop = tokens > num_keep ? drop_idx : keep_idx;
  const KernelId keys =
      by_dtype(dtype, ipcv_ts_keys_fp32, ipcv_ts_keys_fp16, ipcv_ts_keys_bf16);
  int rc = launch(keys, {batch, cdiv(tokens, key_block)}, stream, h_prev, h_cur, ws, b, n,
                  i32(width), i32(num_keep), i32(num_prefix));
  for (int32_t shift : kRadixShifts) {
    if (rc == IPCV_SUCCESS) rc = launch(ipcv_ts_hist, {batch, tiles}, stream, ws, b, n, shift);
    if (rc == IPCV_SUCCESS) rc = launch(ipcv_ts_pick, {batch}, stream, ws, b, n, shift);
  }
  if (rc == IPCV_SUCCESS) rc = launch(ipcv_ts_count, {batch, tiles}, stream, ws, b, n);
  if (rc == IPCV_SUCCESS) {
    rc = launch(ipcv_ts_write, {batch, tiles}, stream, ws, keep_idx, drop, b, n, i32(num_keep));
  }
  return rc;
}

extern "C" IPCV_API size_t ipcv_neighbor_index_workspace(int64_t, int64_t) {
  return 0;  // one kernel, no workspace
}

extern "C" IPCV_API int ipcv_neighbor_index(const void* x_keep, const void* x_drop,
                                            IpcvDType dtype, int64_t batch, int64_t kept,
                                            int64_t dropped, int64_t width,
                                            int64_t num_neighbors, int64_t* nbr, void*,
                                            void* stream) {
  using namespace ipcv;
  using namespace ipcv_aot;
  const int64_t small = ipcv_nb_index_fp32_k16_kpad;
  const int64_t large = ipcv_nb_index_fp32_k32_kpad;
  static_assert(ipcv_nb_index_fp32_k32_kpad == IPCV_MAX_NEIGHBORS, "the k32 variant is the k limit");
  const int64_t block_r = ipcv_nb_index_fp32_k16_block_r;
  if (!valid_dtype(dtype) || batch < 0 || kept < 0 || dropped < 0 || width < 0 ||
      num_neighbors < 1 || num_neighbors > kept || num_neighbors > large ||
      !fits_i32(batch, kept, width) || !fits_i32(batch, dropped, width) ||
      !fits_i32(batch, dropped, num_neighbors) || cdiv(dropped, block_r) > kMaxGridY) {
    return IPCV_ERROR_INVALID_VALUE;
  }
  if (batch == 0 || dropped == 0) return IPCV_SUCCESS;
  const KernelId kernel =
      num_neighbors <= small
          ? by_dtype(dtype, ipcv_nb_index_fp32_k16, ipcv_nb_index_fp16_k16, ipcv_nb_index_bf16_k16)
          : by_dtype(dtype, ipcv_nb_index_fp32_k32, ipcv_nb_index_fp16_k32, ipcv_nb_index_bf16_k32);
  return launch(kernel, {batch, cdiv(dropped, block_r)}, stream, x_keep, x_drop, nbr, i32(kept),
                i32(dropped), i32(width), i32(num_neighbors));
}

extern "C" IPCV_API int ipcv_neighbor_reconstruct(const void* x_keep, const void* x0_keep,
                                                  const void* x0_drop, const int64_t* nbr,
                                                  const int64_t* keep_idx,
                                                  const int64_t* drop_idx, IpcvDType dtype,
                                                  int64_t batch, int64_t kept, int64_t dropped,
                                                  int64_t width, int64_t num_neighbors,
                                                  void* full, void* stream) {
  using namespace ipcv;
  using namespace ipcv_aot;
  const int64_t block_m = ipcv_nb_reconstruct_fp32_block_m;
  if (!valid_dtype(dtype) || batch < 0 || kept < 0 || dropped < 0 || width < 0 ||
      (dropped > 0 && (kept < 1 || num_neighbors < 1)) || num_neighbors < 0 ||
      !fits_i32(batch, kept + dropped, width) || !fits_i32(batch, dropped, num_neighbors) ||
      cdiv(kept, block_m) + cdiv(dropped, block_m) > kMaxGridY) {
    return IPCV_ERROR_INVALID_VALUE;
  }
  if (batch == 0 || kept + dropped == 0 || width == 0) return IPCV_SUCCESS;
  const KernelId kernel = by_dtype(dtype, ipcv_nb_reconstruct_fp32, ipcv_nb_reconstruct_fp16,
                                   ipcv_nb_reconstruct_bf16);
  return launch(kernel, {batch, cdiv(kept, block_m) + cdiv(dropped, block_m)}, stream, x_keep,
                x0_keep, x0_drop, nbr, keep_idx, drop_idx, full, i32(kept), i32(dropped),
                i32(width), i32(num_neighbors));
}
