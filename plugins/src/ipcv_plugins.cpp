// TensorRT IPluginV3 plugins for the `ipcv` ops: TokenSelect, NeighborIndex, NeighborReconstruct.
//
// Names, version ("1") and namespace ("ipcv") match the nodes of the TensorRT flavour of an
// ipcv-deploy export (plugin_version / plugin_namespace attributes); the ONNX parser finds the
// creators through getCreators() when the library is loaded (IPluginRegistry::loadLibrary,
// trtexec --dynamicPlugins). Output shapes are IExprBuilder expressions of the input shapes:
// TokenSelect keeps P = num_keep + (N - num_prefix) * keep_num / keep_den (a fixed count when
// keep_num is 0; a share of a token count N that varies per optimization profile at native
// resolution), never a data-dependent size; the kernels (ipcv_deploy.kernels, Triton, compiled ahead of time and launched
// through the C API of ipcv_kernels.h) compute scores and distances in fp32 for any I/O type.
// enqueue returns the launcher's IpcvStatus (non-zero: TensorRT reports the failure).
#include <NvInferRuntime.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "ipcv_kernels.h"

namespace ipcv_trt {

using namespace nvinfer1;

constexpr char const* kNamespace = "ipcv";
constexpr char const* kVersion = "1";

namespace {

bool is_float(DataType type) {
  return type == DataType::kFLOAT || type == DataType::kHALF || type == DataType::kBF16;
}

IpcvDType to_ipcv(DataType type) {
  return type == DataType::kHALF ? IPCV_FLOAT16 : (type == DataType::kBF16 ? IPCV_BFLOAT16 : IPCV_FLOAT32);
}

}  // namespace

// One integer attribute of an op (num_keep, num_prefix, keep_num, keep_den, num_neighbors).
struct IntAttr {
  char const* name;
  int32_t value;
};

// An attribute a node may leave out, and its value then (artifacts before keep_num existed).
struct OptionalAttr {
  char const* name;
  int32_t value;
};
OptionalAttr const kOptional[] = {{"keep_num", 0}, {"keep_den", 1}};

// What differs between the three ops; the plugin and creator classes below are shared.
struct OpTraits {
  char const* name;
  int32_t inputs;
  int32_t outputs;
  std::vector<char const*> attributes;
};

OpTraits const kTokenSelect{"TokenSelect", 2, 2, {"num_keep", "num_prefix", "keep_num", "keep_den"}};
OpTraits const kNeighborIndex{"NeighborIndex", 2, 1, {"num_neighbors"}};
OpTraits const kNeighborReconstruct{"NeighborReconstruct", 6, 1, {}};

class IpcvPlugin : public IPluginV3,
                   public IPluginV3OneCore,
                   public IPluginV3OneBuild,
                   public IPluginV3OneRuntime {
 public:
  IpcvPlugin(OpTraits const& op, std::vector<IntAttr> attrs) : mOp(op), mAttrs(std::move(attrs)) {}

  int32_t attr(char const* name) const {
    for (auto const& a : mAttrs) {
      if (std::strcmp(a.name, name) == 0) return a.value;
    }
    return 0;
  }

  // P of TokenSelect for N tokens per row (ipcv_deploy.ops.torch_ops.kept_of).
  int64_t kept(int64_t tokens) const {
    return attr("num_keep") + (tokens - attr("num_prefix")) * attr("keep_num") / attr("keep_den");
  }

  // IPluginV3
  IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
    switch (type) {
      case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
      case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
      case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
  }
  IPluginV3* clone() noexcept override { return new (std::nothrow) IpcvPlugin(mOp, mAttrs); }

  // IPluginV3OneCore
  char const* getPluginName() const noexcept override { return mOp.name; }
  char const* getPluginVersion() const noexcept override { return kVersion; }
  char const* getPluginNamespace() const noexcept override { return kNamespace; }

  // IPluginV3OneBuild
  int32_t getNbOutputs() const noexcept override { return mOp.outputs; }

  int32_t configurePlugin(DynamicPluginTensorDesc const*, int32_t, DynamicPluginTensorDesc const*,
                          int32_t) noexcept override {
    return 0;
  }

  int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                             int32_t) const noexcept override {
    for (int32_t i = 0; i < nbOutputs; ++i) {
      outputTypes[i] = &mOp == &kNeighborReconstruct ? inputTypes[0] : DataType::kINT64;
    }
    return 0;
  }

  int32_t getOutputShapes(DimsExprs const* inputs, int32_t, DimsExprs const*, int32_t,
                          DimsExprs* outputs, int32_t, IExprBuilder& expr) noexcept override {
    DimsExprs const& first = inputs[0];
    if (&mOp == &kTokenSelect) {  // keep_idx [B, P], drop_idx [B, N - P]
      auto const* rest = expr.operation(DimensionOperation::kSUB, *first.d[1], *expr.constant(attr("num_prefix")));
      auto const* share = expr.operation(
          DimensionOperation::kFLOOR_DIV,
          *expr.operation(DimensionOperation::kPROD, *rest, *expr.constant(attr("keep_num"))),
          *expr.constant(attr("keep_den")));
      auto const* kept = expr.operation(DimensionOperation::kSUM, *expr.constant(attr("num_keep")), *share);
      outputs[0].nbDims = outputs[1].nbDims = 2;
      outputs[0].d[0] = outputs[1].d[0] = first.d[0];
      outputs[0].d[1] = kept;
      outputs[1].d[1] = expr.operation(DimensionOperation::kSUB, *first.d[1], *kept);
    } else if (&mOp == &kNeighborIndex) {  // nbr [B, R, k]
      outputs[0].nbDims = 3;
      outputs[0].d[0] = inputs[1].d[0];
      outputs[0].d[1] = inputs[1].d[1];
      outputs[0].d[2] = expr.constant(attr("num_neighbors"));
    } else {  // full [B, P + R, D]
      outputs[0].nbDims = 3;
      outputs[0].d[0] = first.d[0];
      outputs[0].d[1] = expr.operation(DimensionOperation::kSUM, *first.d[1], *inputs[2].d[1]);
      outputs[0].d[2] = first.d[2];
    }
    return 0;
  }

  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                 int32_t) noexcept override {
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR) return false;
    int32_t const floats = &mOp == &kNeighborReconstruct ? 3 : 2;  // leading float inputs
    bool const float_slot =
        pos < floats || (&mOp == &kNeighborReconstruct && pos == nbInputs);  // ... and `full`
    if (!float_slot) return desc.type == DataType::kINT64;
    return is_float(desc.type) && (pos == 0 || desc.type == inOut[0].desc.type);
  }

  size_t getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t, DynamicPluginTensorDesc const*,
                          int32_t) const noexcept override {
    Dims const& max = inputs[0].max;
    if (&mOp == &kTokenSelect) return ipcv_token_select_workspace(max.d[0], max.d[1]);
    if (&mOp == &kNeighborIndex) return ipcv_neighbor_index_workspace(max.d[0], max.d[1]);
    return 0;
  }

  // IPluginV3OneRuntime
  int32_t onShapeChange(PluginTensorDesc const*, int32_t, PluginTensorDesc const*, int32_t) noexcept override {
    return 0;
  }

  int32_t enqueue(PluginTensorDesc const* in, PluginTensorDesc const*, void const* const* inputs,
                  void* const* outputs, void* workspace, cudaStream_t stream) noexcept override {
    Dims const& d0 = in[0].dims;
    IpcvDType const dtype = to_ipcv(in[0].type);
    if (&mOp == &kTokenSelect) {
      return ipcv_token_select(inputs[0], inputs[1], dtype, d0.d[0], d0.d[1], d0.d[2], kept(d0.d[1]),
                               attr("num_prefix"), static_cast<int64_t*>(outputs[0]),
                               static_cast<int64_t*>(outputs[1]), workspace, stream);
    }
    if (&mOp == &kNeighborIndex) {
      return ipcv_neighbor_index(inputs[0], inputs[1], dtype, d0.d[0], d0.d[1], in[1].dims.d[1], d0.d[2],
                                 attr("num_neighbors"), static_cast<int64_t*>(outputs[0]), workspace,
                                 stream);
    }
    return ipcv_neighbor_reconstruct(inputs[0], inputs[1], inputs[2], static_cast<int64_t const*>(inputs[3]),
                                     static_cast<int64_t const*>(inputs[4]),
                                     static_cast<int64_t const*>(inputs[5]), dtype, d0.d[0], d0.d[1],
                                     in[2].dims.d[1], d0.d[2], in[3].dims.d[2], outputs[0], stream);
  }

  IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }

  PluginFieldCollection const* getFieldsToSerialize() noexcept override {
    mFields.clear();
    for (auto const& a : mAttrs) mFields.emplace_back(a.name, &a.value, PluginFieldType::kINT32, 1);
    mCollection.nbFields = static_cast<int32_t>(mFields.size());
    mCollection.fields = mFields.data();
    return &mCollection;
  }

 private:
  OpTraits const& mOp;
  std::vector<IntAttr> mAttrs;
  std::vector<PluginField> mFields;
  PluginFieldCollection mCollection{};
};

class IpcvPluginCreator : public IPluginCreatorV3One {
 public:
  explicit IpcvPluginCreator(OpTraits const& op) : mOp(op) {
    for (char const* name : op.attributes) mFields.emplace_back(name, nullptr, PluginFieldType::kINT32, 1);
    mCollection.nbFields = static_cast<int32_t>(mFields.size());
    mCollection.fields = mFields.data();
  }

  char const* getPluginName() const noexcept override { return mOp.name; }
  char const* getPluginVersion() const noexcept override { return kVersion; }
  char const* getPluginNamespace() const noexcept override { return kNamespace; }
  PluginFieldCollection const* getFieldNames() noexcept override { return &mCollection; }

  // Reads the integer attributes (the parser passes ONNX INT attributes as kINT32); a missing
  // required attribute fails plugin creation, so the parser reports the node.
  IPluginV3* createPlugin(char const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept override {
    std::vector<IntAttr> attrs;
    for (char const* name : mOp.attributes) {
      bool found = false;
      for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
        PluginField const& f = fc->fields[i];
        if (std::strcmp(f.name, name) != 0 || f.data == nullptr) continue;
        int32_t value = 0;
        if (f.type == PluginFieldType::kINT32) {
          value = *static_cast<int32_t const*>(f.data);
        } else if (f.type == PluginFieldType::kINT64) {
          value = static_cast<int32_t>(*static_cast<int64_t const*>(f.data));
        } else {
          return nullptr;
        }
        attrs.push_back({name, value});
        found = true;
      }
      for (auto const& optional : kOptional) {
        if (!found && std::strcmp(optional.name, name) == 0) {
          attrs.push_back({name, optional.value});
          found = true;
        }
      }
      if (!found) return nullptr;
    }
    for (auto const& a : attrs) {
      bool const neighbors = std::strcmp(a.name, "num_neighbors") == 0;
      bool const denominator = std::strcmp(a.name, "keep_den") == 0;
      int32_t const low = neighbors || denominator ? 1 : 0;
      if (a.value < low || (neighbors && a.value > IPCV_MAX_NEIGHBORS)) return nullptr;
    }
    return new (std::nothrow) IpcvPlugin(mOp, std::move(attrs));
  }

 private:
  OpTraits const& mOp;
  std::vector<PluginField> mFields;
  PluginFieldCollection mCollection{};
};

}  // namespace ipcv_trt

extern "C" {

// Entry points TensorRT looks up in a plugin library loaded by path (exported: the library is
// built with hidden visibility).
IPCV_API TENSORRTAPI void setLoggerFinder(nvinfer1::ILoggerFinder*) {}

IPCV_API TENSORRTAPI nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static ipcv_trt::IpcvPluginCreator tokenSelect(ipcv_trt::kTokenSelect);
  static ipcv_trt::IpcvPluginCreator neighborIndex(ipcv_trt::kNeighborIndex);
  static ipcv_trt::IpcvPluginCreator neighborReconstruct(ipcv_trt::kNeighborReconstruct);
  static nvinfer1::IPluginCreatorInterface* creators[] = {&tokenSelect, &neighborIndex, &neighborReconstruct};
  nbCreators = 3;
  return creators;
}

}  // extern "C"
