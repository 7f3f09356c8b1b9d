// Launches the embedded ahead-of-time compiled Triton kernels (ipcv_kernels_aot.h) through the
// CUDA driver API, loaded with dlopen at first use.
#pragma once

#include <cuda.h>

#include <cstddef>
#include <cstdint>

#include "ipcv_kernels.h"
#include "ipcv_kernels_aot.h"

namespace ipcv {

struct Grid {
  int64_t x = 1, y = 1, z = 1;
};

// cuLaunchKernel of kernel `id` (loaded for the current context's device at first use, then
// cached per context) with `count` parameters of the given sizes, checked against the
// kernel's signature; params has room for two more, Triton's trailing scratch pointers.
// Returns an IpcvStatus / CUresult.
int launch_raw(ipcv_aot::KernelId id, Grid grid, CUstream stream, void** params,
               const size_t* sizes, int count);

// Launches kernel `id` with Triton's argument layout: the non-constexpr arguments in
// signature order (pointers, int32_t, int64_t, float: pass exactly the signature's types).
template <typename... Args>
int launch(ipcv_aot::KernelId id, Grid grid, void* stream, Args... args) {
  void* params[] = {static_cast<void*>(&args)..., nullptr, nullptr};
  const size_t sizes[] = {sizeof(Args)..., 0};
  return launch_raw(id, grid, static_cast<CUstream>(stream), params, sizes,
                    static_cast<int>(sizeof...(Args)));
}

}  // namespace ipcv
