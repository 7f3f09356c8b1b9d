// Shared device helpers of the ipcv kernels: float conversion and dtype dispatch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ipcv_kernels.h"

namespace ipcv {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Sum over a warp; every lane gets the result.
__device__ __forceinline__ float warp_sum(float value) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

// Calls fn.template operator()<T>() with T the element type of dtype.
template <typename Fn>
int dispatch(IpcvDType dtype, Fn&& fn) {
  switch (dtype) {
    case IPCV_FLOAT32: return fn(float{});
    case IPCV_FLOAT16: return fn(__half{});
    case IPCV_BFLOAT16: return fn(__nv_bfloat16{});
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

constexpr int kWarp = 32;

}  // namespace ipcv
