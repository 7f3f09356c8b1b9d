// The `ipcv` ops (domain ipcv, version 1) as op-level launchers behind a C API.
//
// The kernels are the Triton kernels of ipcv_deploy.kernels, compiled ahead of time to cubin
// and PTX (python -m ipcv_deploy.kernels.aot) and embedded in the library; the launchers
// replay their host launch sequences through the CUDA driver API, which is loaded with
// dlopen("libcuda.so.1") at the first launch. The library therefore loads, and checks its
// arguments, on a machine without a CUDA driver. The TensorRT plugins (src/ipcv_plugins.cpp)
// and the Python binding (ipcv_deploy/trt/kernels.py, through ctypes) call the same launchers.
//
// Layout: row-major [B, N, D] tensors of one float type, int64 indices, device pointers of
// the current CUDA context. Token scores and distances are fp32 whatever the I/O type.
// `stream` is a CUstream (equivalently a cudaStream_t; NULL is the legacy default stream).
// Every launcher returns an IpcvStatus: 0 on success, IPCV_ERROR_INVALID_VALUE for bad sizes
// (checked before any GPU work), a negative ipcv code, or the CUresult of a failed driver call.
#pragma once

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define IPCV_API
#else
#define IPCV_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

// The largest num_neighbors (k) NeighborIndex takes (ipcv_deploy.ops.specs.KERNEL_MAX_NEIGHBORS).
#define IPCV_MAX_NEIGHBORS 32

// Element type of the float tensors.
typedef enum { IPCV_FLOAT32 = 0, IPCV_FLOAT16 = 1, IPCV_BFLOAT16 = 2 } IpcvDType;

// Launcher results besides the CUresult codes of failed driver calls.
typedef enum {
  IPCV_SUCCESS = 0,
  IPCV_ERROR_INVALID_VALUE = 1,  // == CUDA_ERROR_INVALID_VALUE: sizes / dtype out of range
  IPCV_ERROR_NO_DRIVER = -1,     // libcuda.so.1 missing, or a driver entry point missing
  IPCV_ERROR_NO_IMAGE = -2,      // no cubin for this GPU and no PTX it can JIT-compile
  IPCV_ERROR_ABI = -3            // launcher and embedded kernel disagree on the parameters
} IpcvStatus;

// A one-line description of a launcher result (ipcv codes and driver CUresults).
IPCV_API const char* ipcv_status_string(int status);

// TokenSelect: keep_idx [B, P] and drop_idx [B, N - P], each ascending, from the fp32
// scores ||h_cur - h_prev||_2; the first num_prefix tokens of a row are always kept. Ties keep
// the lower index, a NaN score ranks lowest. Limits: B*N*D < 2^31 (the kernels' i32 offsets),
// N <= 64 * 65535. The workspace holds keys, radix histograms and per-tile counts.
IPCV_API size_t ipcv_token_select_workspace(int64_t batch, int64_t tokens);
IPCV_API int ipcv_token_select(const void* h_prev, const void* h_cur, IpcvDType dtype,
                               int64_t batch, int64_t tokens, int64_t width, int64_t num_keep,
                               int64_t num_prefix, int64_t* keep_idx, int64_t* drop_idx,
                               void* workspace, void* stream);

// NeighborIndex: nbr [B, R, k], the k kept tokens nearest to each pruned token, nearest first
// (fp32 |a|^2 + |b|^2 - 2ab; ties take the lower index, a NaN distance ranks farthest).
// Limits: 1 <= k <= min(P, 32); B*P*D, B*R*D, B*R*k < 2^31; R <= 64 * 65535. Needs no
// workspace (ipcv_neighbor_index_workspace returns 0; `workspace` may be NULL).
IPCV_API size_t ipcv_neighbor_index_workspace(int64_t batch, int64_t kept);
IPCV_API int ipcv_neighbor_index(const void* x_keep, const void* x_drop, IpcvDType dtype,
                                 int64_t batch, int64_t kept, int64_t dropped, int64_t width,
                                 int64_t num_neighbors, int64_t* nbr, void* workspace,
                                 void* stream);

// NeighborReconstruct: full [B, P + R, D] with full[keep_idx] = x_keep and
// full[drop_idx] = x0_drop + mean_j (x_keep - x0_keep)[nbr[:, j]], accumulated in fp32.
// Limits: k >= 1 and P >= 1 when R > 0; B*N*D, B*R*k < 2^31; cdiv(P, 32) + cdiv(R, 32) <= 65535.
IPCV_API int ipcv_neighbor_reconstruct(const void* x_keep, const void* x0_keep,
                                       const void* x0_drop, const int64_t* nbr,
                                       const int64_t* keep_idx, const int64_t* drop_idx,
                                       IpcvDType dtype, int64_t batch, int64_t kept,
                                       int64_t dropped, int64_t width, int64_t num_neighbors,
                                       void* full, void* stream);

#ifdef __cplusplus
}
#endif
