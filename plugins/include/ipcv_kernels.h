// CUDA kernels of the `ipcv` op contract (domain ipcv, version 1), behind a C API.
//
// The TensorRT plugins (src/ipcv_plugins.cpp) and the Python test harness
// (ipcv_deploy/trt/kernels.py, through ctypes) call the same launchers, so the kernels are
// tested against the PyTorch reference ops without TensorRT. Layout: row-major [B, N, D]
// tensors of one float type, int64 indices. Token scores and distances are fp32 whatever
// the I/O type. Every launcher returns a cudaError_t value (0 = success).
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element type of the float tensors.
typedef enum { IPCV_FLOAT32 = 0, IPCV_FLOAT16 = 1, IPCV_BFLOAT16 = 2 } IpcvDType;

// TokenSelect: keep_idx [B, P] and drop_idx [B, N - P], each ascending, from the fp32
// scores ||h_cur - h_prev||_2; the first num_prefix tokens of a row are always kept. Ties keep
// the lower index. No limit on P (selection ranks scores instead of calling a top-k);
// N <= 49152.
size_t ipcv_token_select_workspace(int64_t batch, int64_t tokens);
int ipcv_token_select(const void* h_prev, const void* h_cur, IpcvDType dtype, int64_t batch,
                      int64_t tokens, int64_t width, int64_t num_keep, int64_t num_prefix,
                      int64_t* keep_idx, int64_t* drop_idx, void* workspace, cudaStream_t stream);

// NeighborIndex: nbr [B, R, k], the k kept tokens nearest to each pruned token, nearest first
// (fp32 |a|^2 + |b|^2 - 2ab; ties take the lower index). Needs P + D <= 12288.
size_t ipcv_neighbor_index_workspace(int64_t batch, int64_t kept);
int ipcv_neighbor_index(const void* x_keep, const void* x_drop, IpcvDType dtype, int64_t batch,
                        int64_t kept, int64_t dropped, int64_t width, int64_t num_neighbors,
                        int64_t* nbr, void* workspace, cudaStream_t stream);

// NeighborReconstruct: full [B, P + R, D] with full[keep_idx] = x_keep and
// full[drop_idx] = x0_drop + mean_j (x_keep - x0_keep)[nbr[:, j]], accumulated in fp32.
int ipcv_neighbor_reconstruct(const void* x_keep, const void* x0_keep, const void* x0_drop,
                              const int64_t* nbr, const int64_t* keep_idx,
                              const int64_t* drop_idx, IpcvDType dtype, int64_t batch,
                              int64_t kept, int64_t dropped, int64_t width,
                              int64_t num_neighbors, void* full, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
