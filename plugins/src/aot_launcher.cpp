// The CUDA driver API, resolved with dlopen / dlsym at first use, and the per-context cache
// of the modules loaded from the embedded cubin / PTX images.
#include "aot_launcher.h"

#include <dlfcn.h>

#include <map>
#include <mutex>
#include <utility>

namespace ipcv {
namespace {

struct Driver {
  CUresult (*init)(unsigned int) = nullptr;
  CUresult (*ctx_get_current)(CUcontext*) = nullptr;
  CUresult (*ctx_get_device)(CUdevice*) = nullptr;
  CUresult (*ctx_get_id)(CUcontext, unsigned long long*) = nullptr;  // CUDA >= 12.0; optional
  CUresult (*device_get_attribute)(int*, CUdevice_attribute, CUdevice) = nullptr;
  CUresult (*module_load_data)(CUmodule*, const void*) = nullptr;
  CUresult (*module_get_function)(CUfunction*, CUmodule, const char*) = nullptr;
  CUresult (*func_set_attribute)(CUfunction, CUfunction_attribute, int) = nullptr;
  CUresult (*launch_kernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned,
                            unsigned, unsigned, CUstream, void**, void**) = nullptr;
  CUresult (*get_error_string)(CUresult, const char**) = nullptr;
  int status = IPCV_ERROR_NO_DRIVER;  // IPCV_SUCCESS once loaded and initialised
};

template <typename Fn>
bool resolve(void* library, const char* name, Fn* fn) {
  *fn = reinterpret_cast<Fn>(dlsym(library, name));
  return *fn != nullptr;
}

const Driver& driver() {
  static const Driver loaded = [] {
    Driver d;
    void* library = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (library == nullptr) return d;
    resolve(library, "cuCtxGetId", &d.ctx_get_id);
    const bool complete =
        resolve(library, "cuInit", &d.init) &&
        resolve(library, "cuCtxGetCurrent", &d.ctx_get_current) &&
        resolve(library, "cuCtxGetDevice", &d.ctx_get_device) &&
        resolve(library, "cuDeviceGetAttribute", &d.device_get_attribute) &&
        resolve(library, "cuModuleLoadData", &d.module_load_data) &&
        resolve(library, "cuModuleGetFunction", &d.module_get_function) &&
        resolve(library, "cuFuncSetAttribute", &d.func_set_attribute) &&
        resolve(library, "cuLaunchKernel", &d.launch_kernel) &&
        resolve(library, "cuGetErrorString", &d.get_error_string);
    if (complete) d.status = static_cast<int>(d.init(0));
    return d;
  }();
  return loaded;
}

// The image to load on a device of capability `arch`: the cubin built for it, else the PTX
// of the highest portable image not above it (the driver JIT-compiles it).
const ipcv_aot::Image* pick_image(const ipcv_aot::Kernel& kernel, int arch, bool* use_cubin) {
  const ipcv_aot::Image* ptx = nullptr;
  for (int i = 0; i < kernel.num_images; ++i) {
    const ipcv_aot::Image& image = kernel.images[i];
    if (image.arch == arch) {
      *use_cubin = true;
      return &image;
    }
    if (image.ptx != nullptr && image.arch < arch) ptx = &image;
  }
  *use_cubin = false;
  return ptx;
}

struct Loaded {
  CUfunction function;
  const ipcv_aot::Image* image;
};

int load(const Driver& d, ipcv_aot::KernelId id, Loaded* out) {
  CUdevice device = 0;
  int major = 0, minor = 0;
  CUresult rc = d.ctx_get_device(&device);
  if (rc == CUDA_SUCCESS) {
    rc = d.device_get_attribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device);
  }
  if (rc == CUDA_SUCCESS) {
    rc = d.device_get_attribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device);
  }
  if (rc != CUDA_SUCCESS) return static_cast<int>(rc);
  bool use_cubin = false;
  const ipcv_aot::Image* image = pick_image(ipcv_aot::kKernels[id], major * 10 + minor, &use_cubin);
  if (image == nullptr) return IPCV_ERROR_NO_IMAGE;
  CUmodule module = nullptr;
  rc = d.module_load_data(&module, use_cubin ? static_cast<const void*>(image->cubin)
                                             : static_cast<const void*>(image->ptx));
  if (rc == CUDA_SUCCESS) rc = d.module_get_function(&out->function, module, image->function);
  if (rc == CUDA_SUCCESS && image->shared > 48 * 1024) {
    rc = d.func_set_attribute(out->function, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                              static_cast<int>(image->shared));
  }
  out->image = image;
  return static_cast<int>(rc);
}

// The kernel of `id` for the current context's device, loaded on first use and cached per
// context. Returns an IpcvStatus / CUresult.
int get_function(ipcv_aot::KernelId id, CUfunction* function, const ipcv_aot::Image** image) {
  const Driver& d = driver();
  if (d.status != IPCV_SUCCESS) return d.status;
  CUcontext context = nullptr;
  CUresult rc = d.ctx_get_current(&context);
  if (rc != CUDA_SUCCESS) return static_cast<int>(rc);
  if (context == nullptr) return static_cast<int>(CUDA_ERROR_INVALID_CONTEXT);
  // Context ids are never reused; a context's address may be, after it is destroyed.
  unsigned long long context_key = reinterpret_cast<uintptr_t>(context);
  if (d.ctx_get_id != nullptr && d.ctx_get_id(context, &context_key) != CUDA_SUCCESS) {
    context_key = reinterpret_cast<uintptr_t>(context);
  }
  static std::mutex mutex;
  static std::map<std::pair<unsigned long long, int>, Loaded> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto found = cache.find({context_key, id});
  if (found == cache.end()) {
    Loaded loaded{};
    const int status = load(d, id, &loaded);
    if (status != IPCV_SUCCESS) return status;
    found = cache.emplace(std::make_pair(context_key, static_cast<int>(id)), loaded).first;
  }
  *function = found->second.function;
  *image = found->second.image;
  return IPCV_SUCCESS;
}

}  // namespace

int launch_raw(ipcv_aot::KernelId id, Grid grid, CUstream stream, void** params,
               const size_t* sizes, int count) {
  const ipcv_aot::Kernel& kernel = ipcv_aot::kKernels[id];
  if (count != kernel.num_params) return IPCV_ERROR_ABI;
  for (int i = 0; i < count; ++i) {
    if (sizes[i] != kernel.param_bytes[i]) return IPCV_ERROR_ABI;
  }
  if (grid.x < 0 || grid.y < 0 || grid.z < 0) return IPCV_ERROR_INVALID_VALUE;
  if (grid.x > 0x7fffffff || grid.y > 65535 || grid.z > 65535) return IPCV_ERROR_INVALID_VALUE;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return IPCV_SUCCESS;
  CUfunction function = nullptr;
  const ipcv_aot::Image* image = nullptr;
  const int status = get_function(id, &function, &image);
  if (status != IPCV_SUCCESS) return status;
  // Triton kernels take a global-scratch and a profile-scratch pointer after their
  // arguments; the AOT build rejects kernels that use either, so both are null.
  void* scratch = nullptr;
  params[count] = &scratch;
  params[count + 1] = &scratch;
  return static_cast<int>(driver().launch_kernel(
      function, static_cast<unsigned>(grid.x), static_cast<unsigned>(grid.y),
      static_cast<unsigned>(grid.z), static_cast<unsigned>(32 * image->num_warps), 1, 1,
      image->shared, stream, params, nullptr));
}

}  // namespace ipcv

extern "C" IPCV_API const char* ipcv_status_string(int status) {
  switch (status) {
    case IPCV_SUCCESS: return "success";
    case IPCV_ERROR_INVALID_VALUE: return "invalid argument: a size or dtype is out of range";
    case IPCV_ERROR_NO_DRIVER:
      return "no CUDA driver: libcuda.so.1 could not be loaded or lacks an entry point";
    case IPCV_ERROR_NO_IMAGE:
      return "no kernel image for this GPU: rebuild the library for its architecture";
    case IPCV_ERROR_ABI:
      return "launcher and embedded kernel disagree on the parameters: rebuild the library";
    default: break;
  }
  const ipcv::Driver& d = ipcv::driver();
  const char* text = nullptr;
  if (d.get_error_string != nullptr &&
      d.get_error_string(static_cast<CUresult>(status), &text) == CUDA_SUCCESS && text) {
    return text;
  }
  return "CUDA driver error";
}
