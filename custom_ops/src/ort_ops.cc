// ONNX Runtime binding of the `mfqat` operators MXDequantize and MXQuantize.
//
// The library calls ONNX Runtime only through the C API table it receives in
// RegisterCustomOps, so it never links libonnxruntime. It loads into any
// onnxruntime whose API version is at least that of its headers. Every entry point catches C++ exceptions and returns them as an
// OrtStatus, so bad attributes or tensors become Python exceptions instead of
// a crash.
#include <cstdint>
#include <cstring>
#include <exception>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "mx_format.h"
#include "mx_kernels.h"
#include "onnxruntime_c_api.h"

#if defined(_WIN32)
#define MFQAT_EXPORT __declspec(dllexport)
#else
#define MFQAT_EXPORT __attribute__((visibility("default")))
#endif

// The API version requested from the running onnxruntime; defaults to the
// version of the headers. The tests build a copy with a larger value to check
// the error path for an onnxruntime that is too old.
#ifndef MFQAT_ORT_API_VERSION
#define MFQAT_ORT_API_VERSION ORT_API_VERSION
#endif

namespace mfqat {
namespace {

constexpr const char* kDomain = "mfqat";
constexpr int kOpsetVersion = 1;

class OrtError : public std::runtime_error {
 public:
  OrtError(OrtErrorCode code, const std::string& message) : std::runtime_error(message), code_(code) {}
  OrtErrorCode code() const { return code_; }

 private:
  OrtErrorCode code_;
};

void ThrowOnError(const OrtApi* api, OrtStatus* status) {
  if (status == nullptr) return;
  const std::string message = api->GetErrorMessage(status);
  const OrtErrorCode code = api->GetErrorCode(status);
  api->ReleaseStatus(status);
  throw OrtError(code, message);
}

// Runs body and turns any C++ exception into an OrtStatus for the caller.
template <typename Body>
OrtStatus* ReturnStatus(const OrtApi* api, Body&& body) noexcept {
  try {
    body();
    return nullptr;
  } catch (const OrtError& e) {
    return api->CreateStatus(e.code(), e.what());
  } catch (const std::invalid_argument& e) {
    return api->CreateStatus(ORT_INVALID_ARGUMENT, e.what());
  } catch (const std::bad_alloc&) {
    return api->CreateStatus(ORT_FAIL, "mfqat kernel: out of memory");
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  } catch (...) {
    return api->CreateStatus(ORT_FAIL, "mfqat kernel: unknown C++ exception");
  }
}

std::string ShapeText(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

// ---------------------------------------------------------------------------
// Attributes

class NodeAttributes {
 public:
  NodeAttributes(const OrtApi* api, const OrtKernelInfo* info, const char* op_type)
      : api_(api), info_(info) {
    std::string name;
    if (ReadString("", &name, /*node_name=*/true) && !name.empty()) {
      where_ = std::string(op_type) + " node '" + name + "'";
    } else {
      where_ = std::string(op_type) + " node";
    }
  }

  const std::string& where() const { return where_; }

  std::string String(const char* attr, const char* fallback) const {
    std::string value;
    if (ReadString(attr, &value, false)) return value;
    if (fallback != nullptr) return fallback;
    throw std::invalid_argument(where_ + ": missing required string attribute '" + attr + "'");
  }

  int64_t Int(const char* attr, const int64_t* fallback) const {
    int64_t value = 0;
    OrtStatus* status = api_->KernelInfoGetAttribute_int64(info_, attr, &value);
    if (status == nullptr) return value;
    api_->ReleaseStatus(status);
    if (fallback != nullptr) return *fallback;
    throw std::invalid_argument(where_ + ": missing required int attribute '" + attr + "'");
  }

 private:
  // Reads a string attribute (or the node name); false when it is absent.
  bool ReadString(const char* attr, std::string* out, bool node_name) const {
    size_t size = 0;
    OrtStatus* status = node_name ? api_->KernelInfo_GetNodeName(info_, nullptr, &size)
                                  : api_->KernelInfoGetAttribute_string(info_, attr, nullptr, &size);
    if (status != nullptr) {
      api_->ReleaseStatus(status);
      return false;
    }
    std::vector<char> buffer(size + 1, '\0');
    ThrowOnError(api_, node_name ? api_->KernelInfo_GetNodeName(info_, buffer.data(), &size)
                                 : api_->KernelInfoGetAttribute_string(info_, attr, buffer.data(), &size));
    *out = std::string(buffer.data());
    return true;
  }

  const OrtApi* api_;
  const OrtKernelInfo* info_;
  std::string where_;
};

// Blocking attributes shared by both operators.
struct BlockAttributes {
  std::string where;
  const MXFormat* fmt = nullptr;
  int64_t axis = -1;
  int64_t block_size = 32;

  BlockAttributes(const NodeAttributes& attrs) : where(attrs.where()) {
    const std::string format = attrs.String("format", nullptr);
    try {
      fmt = &GetFormat(format);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(where + ": " + e.what());
    }
    const int64_t default_axis = -1;
    const int64_t default_block_size = 32;
    axis = attrs.Int("axis", &default_axis);
    block_size = attrs.Int("block_size", &default_block_size);
    if (block_size < 1) {
      throw std::invalid_argument(where + ": block_size must be a positive integer, got " +
                                  std::to_string(block_size));
    }
  }

  // The axis in [0, rank); throws for a 0-d tensor or an axis out of range.
  int64_t NormalizedAxis(size_t rank, const char* input) const {
    const int64_t r = static_cast<int64_t>(rank);
    if (r == 0) {
      throw std::invalid_argument(where + ": input '" + input + "' is 0-d; MX blocks need at least one axis");
    }
    if (axis < -r || axis >= r) {
      throw std::invalid_argument(where + ": axis " + std::to_string(axis) + " is out of range for input '" +
                                  input + "' of rank " + std::to_string(r) + "; use -" + std::to_string(r) +
                                  " .. " + std::to_string(r - 1));
    }
    return axis < 0 ? axis + r : axis;
  }
};

// ---------------------------------------------------------------------------
// Tensors

struct InputTensor {
  std::vector<int64_t> shape;
  const void* data = nullptr;
};

InputTensor GetInput(const OrtApi* api, OrtKernelContext* context, size_t index) {
  const OrtValue* value = nullptr;
  ThrowOnError(api, api->KernelContext_GetInput(context, index, &value));
  OrtTensorTypeAndShapeInfo* info = nullptr;
  ThrowOnError(api, api->GetTensorTypeAndShape(value, &info));
  InputTensor tensor;
  size_t rank = 0;
  OrtStatus* status = api->GetDimensionsCount(info, &rank);
  if (status == nullptr) {
    tensor.shape.resize(rank);
    status = api->GetDimensions(info, tensor.shape.data(), rank);
  }
  api->ReleaseTensorTypeAndShapeInfo(info);
  ThrowOnError(api, status);
  void* data = nullptr;
  ThrowOnError(api, api->GetTensorMutableData(const_cast<OrtValue*>(value), &data));
  tensor.data = data;
  return tensor;
}

void* GetOutput(const OrtApi* api, OrtKernelContext* context, size_t index, const std::vector<int64_t>& shape) {
  OrtValue* value = nullptr;
  ThrowOnError(api, api->KernelContext_GetOutput(context, index, shape.data(), shape.size(), &value));
  void* data = nullptr;
  ThrowOnError(api, api->GetTensorMutableData(value, &data));
  return data;
}

int64_t Product(const std::vector<int64_t>& shape, size_t begin, size_t end) {
  int64_t product = 1;
  for (size_t i = begin; i < end; ++i) product *= shape[i];
  return product;
}

// Splits work over the session's intra-op thread pool.
class OrtRunner final : public TaskRunner {
 public:
  OrtRunner(const OrtApi* api, const OrtKernelContext* context) : api_(api), context_(context) {}

  void Run(size_t n_tasks, void (*fn)(void*, size_t), void* context) const override {
    OrtStatus* status = api_->KernelContext_ParallelFor(context_, fn, n_tasks, 0, context);
    if (status == nullptr) return;
    // Tasks only write their own outputs, so running all of them again
    // serially is safe.
    api_->ReleaseStatus(status);
    SerialRunner().Run(n_tasks, fn, context);
  }

 private:
  const OrtApi* api_;
  const OrtKernelContext* context_;
};

// ---------------------------------------------------------------------------
// Kernels

class DequantizeKernel {
 public:
  static constexpr const char* kOpType = "MXDequantize";

  DequantizeKernel(const OrtApi* api, const NodeAttributes& node) : api_(api), attrs_(node) {
    axis_length_ = node.Int("axis_length", nullptr);
    if (axis_length_ < 0) {
      throw std::invalid_argument(attrs_.where + ": axis_length must be >= 0, got " + std::to_string(axis_length_));
    }
  }

  const OrtApi* api() const { return api_; }

  void Compute(OrtKernelContext* context) const {
    const InputTensor codes = GetInput(api_, context, 0);
    const InputTensor scales = GetInput(api_, context, 1);
    const MXFormat& fmt = *attrs_.fmt;
    const int64_t axis = attrs_.NormalizedAxis(codes.shape.size(), "codes");
    const BlockGeometry g = MakeGeometry(fmt, Product(codes.shape, 0, axis), axis_length_,
                                         Product(codes.shape, axis + 1, codes.shape.size()), attrs_.block_size);
    CheckShapes(codes.shape, scales.shape, axis, g);

    std::vector<int64_t> y_shape = codes.shape;
    y_shape[axis] = axis_length_;
    float* y = static_cast<float*>(GetOutput(api_, context, 0, y_shape));
    if (g.outer == 0 || g.inner == 0 || g.length == 0) return;
    Dequantize(fmt, g, static_cast<const uint8_t*>(codes.data), static_cast<const uint8_t*>(scales.data), y,
               OrtRunner(api_, context));
  }

 private:
  void CheckShapes(const std::vector<int64_t>& codes, const std::vector<int64_t>& scales, int64_t axis,
                   const BlockGeometry& g) const {
    const std::string attrs_text = "axis=" + std::to_string(attrs_.axis) + ", axis_length=" +
                                   std::to_string(axis_length_) + ", block_size=" +
                                   std::to_string(g.block_size) + ", format=" + attrs_.fmt->name;
    const int64_t expected_bytes = g.n_blocks * g.bytes_per_block;
    if (codes[axis] != expected_bytes) {
      throw std::invalid_argument(
          attrs_.where + ": codes of shape " + ShapeText(codes) + " do not match the attributes (" + attrs_text +
          "): axis " + std::to_string(axis) + " must hold " + std::to_string(g.n_blocks) + " blocks x " +
          std::to_string(g.bytes_per_block) + " bytes = " + std::to_string(expected_bytes) + " bytes, got " +
          std::to_string(codes[axis]) + "; were the codes packed for another format or block size?");
    }
    std::vector<int64_t> expected_scales = codes;
    expected_scales[axis] = g.n_blocks;
    if (scales != expected_scales) {
      throw std::invalid_argument(attrs_.where + ": scales have shape " + ShapeText(scales) + ", expected " +
                                  ShapeText(expected_scales) + " (codes shape " + ShapeText(codes) + " with " +
                                  std::to_string(g.n_blocks) + " blocks on axis " + std::to_string(axis) +
                                  "; " + attrs_text + ")");
    }
  }

  const OrtApi* api_;
  BlockAttributes attrs_;
  int64_t axis_length_ = 0;
};

class QuantizeKernel {
 public:
  static constexpr const char* kOpType = "MXQuantize";

  QuantizeKernel(const OrtApi* api, const NodeAttributes& node) : api_(api), attrs_(node) {
    const std::string rule = node.String("scale_rule", "floor");
    try {
      rule_ = ParseScaleRule(rule);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(attrs_.where + ": " + e.what());
    }
  }

  const OrtApi* api() const { return api_; }

  void Compute(OrtKernelContext* context) const {
    const InputTensor x = GetInput(api_, context, 0);
    const MXFormat& fmt = *attrs_.fmt;
    const int64_t axis = attrs_.NormalizedAxis(x.shape.size(), "x");
    const BlockGeometry g = MakeGeometry(fmt, Product(x.shape, 0, axis), x.shape[axis],
                                         Product(x.shape, axis + 1, x.shape.size()), attrs_.block_size);

    std::vector<int64_t> codes_shape = x.shape;
    codes_shape[axis] = g.n_blocks * g.bytes_per_block;
    std::vector<int64_t> scales_shape = x.shape;
    scales_shape[axis] = g.n_blocks;
    uint8_t* codes = static_cast<uint8_t*>(GetOutput(api_, context, 0, codes_shape));
    uint8_t* scales = static_cast<uint8_t*>(GetOutput(api_, context, 1, scales_shape));
    if (g.outer == 0 || g.inner == 0 || g.length == 0) return;
    Quantize(fmt, rule_, g, static_cast<const float*>(x.data), codes, scales, OrtRunner(api_, context));
  }

 private:
  const OrtApi* api_;
  BlockAttributes attrs_;
  ScaleRule rule_ = ScaleRule::kFloor;
};

// ---------------------------------------------------------------------------
// OrtCustomOp tables

template <typename Kernel>
struct CustomOp : OrtCustomOp {
  CustomOp(std::vector<ONNXTensorElementDataType> inputs,
           std::vector<ONNXTensorElementDataType> outputs)
      : OrtCustomOp{}, inputs_(std::move(inputs)), outputs_(std::move(outputs)) {
    version = ORT_API_VERSION;
    GetName = [](const OrtCustomOp*) noexcept { return Kernel::kOpType; };
    GetExecutionProviderType = [](const OrtCustomOp*) noexcept { return "CPUExecutionProvider"; };
    GetInputTypeCount = [](const OrtCustomOp* op) noexcept { return Self(op)->inputs_.size(); };
    GetInputType = [](const OrtCustomOp* op, size_t i) noexcept { return Self(op)->inputs_[i]; };
    GetOutputTypeCount = [](const OrtCustomOp* op) noexcept { return Self(op)->outputs_.size(); };
    GetOutputType = [](const OrtCustomOp* op, size_t i) noexcept { return Self(op)->outputs_[i]; };
    GetInputCharacteristic = [](const OrtCustomOp*, size_t) noexcept { return INPUT_OUTPUT_REQUIRED; };
    GetOutputCharacteristic = [](const OrtCustomOp*, size_t) noexcept { return INPUT_OUTPUT_REQUIRED; };
    GetInputMemoryType = [](const OrtCustomOp*, size_t) noexcept { return OrtMemTypeDefault; };
    GetVariadicInputMinArity = [](const OrtCustomOp*) noexcept { return 1; };
    GetVariadicInputHomogeneity = [](const OrtCustomOp*) noexcept { return 1; };
    GetVariadicOutputMinArity = [](const OrtCustomOp*) noexcept { return 1; };
    GetVariadicOutputHomogeneity = [](const OrtCustomOp*) noexcept { return 1; };
    // Only version 1 of the domain exists; a model importing another version
    // finds no kernel instead of silently running these semantics.
    GetStartVersion = [](const OrtCustomOp*) noexcept { return kOpsetVersion; };
    GetEndVersion = [](const OrtCustomOp*) noexcept { return kOpsetVersion; };

    // The V1 entry points cannot report errors; ONNX Runtime uses the V2 ones
    // for any op whose version is 16 or newer.
    CreateKernel = nullptr;
    KernelCompute = nullptr;
    CreateKernelV2 = [](const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info,
                        void** kernel) noexcept -> OrtStatusPtr {
      *kernel = nullptr;
      return ReturnStatus(api, [&] { *kernel = new Kernel(api, NodeAttributes(api, info, Kernel::kOpType)); });
    };
    KernelComputeV2 = [](void* kernel, OrtKernelContext* context) noexcept -> OrtStatusPtr {
      Kernel* self = static_cast<Kernel*>(kernel);
      return ReturnStatus(self->api(), [&] { self->Compute(context); });
    };
    KernelDestroy = [](void* kernel) noexcept { delete static_cast<Kernel*>(kernel); };
    InferOutputShapeFn = nullptr;
  }

 private:
  static const CustomOp* Self(const OrtCustomOp* op) { return static_cast<const CustomOp*>(op); }

  std::vector<ONNXTensorElementDataType> inputs_;
  std::vector<ONNXTensorElementDataType> outputs_;
};

// Op objects and the domain live as long as the library: sessions keep
// pointers to them after RegisterCustomOps returns.
const CustomOp<DequantizeKernel>& DequantizeOp() {
  static const CustomOp<DequantizeKernel> op({ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8},
                                             {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT});
  return op;
}

const CustomOp<QuantizeKernel>& QuantizeOp() {
  static const CustomOp<QuantizeKernel> op({ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT},
                                           {ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8});
  return op;
}

// One domain per onnxruntime API table, created on first use and never
// released, because every session options object that received it may still
// be in use.
OrtCustomOpDomain* SharedDomain(const OrtApi* api) {
  static std::mutex mutex;
  static std::vector<std::pair<const OrtApi*, OrtCustomOpDomain*>> domains;
  std::lock_guard<std::mutex> lock(mutex);
  for (const auto& entry : domains) {
    if (entry.first == api) return entry.second;
  }
  OrtCustomOpDomain* domain = nullptr;
  ThrowOnError(api, api->CreateCustomOpDomain(kDomain, &domain));
  OrtStatus* status = api->CustomOpDomain_Add(domain, &DequantizeOp());
  if (status == nullptr) status = api->CustomOpDomain_Add(domain, &QuantizeOp());
  if (status != nullptr) {
    api->ReleaseCustomOpDomain(domain);
    ThrowOnError(api, status);
  }
  domains.emplace_back(api, domain);
  return domain;
}

OrtStatus* TooOldStatus(const OrtApiBase* api_base) {
  // API version 1 exists in every onnxruntime, so it can report the problem.
  const OrtApi* any_api = api_base->GetApi(1);
  if (any_api == nullptr) return nullptr;
  const std::string message =
      std::string("the mfqat kernel library needs ONNX Runtime C API version ") +
      std::to_string(MFQAT_ORT_API_VERSION) + " (onnxruntime 1." + std::to_string(MFQAT_ORT_API_VERSION) +
      " or newer), but the loaded onnxruntime " + api_base->GetVersionString() +
      " does not provide it; upgrade onnxruntime, or run the model without the library through its "
      "function bodies";
  return any_api->CreateStatus(ORT_FAIL, message.c_str());
}

}  // namespace
}  // namespace mfqat

extern "C" MFQAT_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                  const OrtApiBase* api_base) {
  if (api_base == nullptr) return nullptr;
  const OrtApi* api = api_base->GetApi(MFQAT_ORT_API_VERSION);
  if (api == nullptr) return mfqat::TooOldStatus(api_base);
  return mfqat::ReturnStatus(api, [&] {
    mfqat::ThrowOnError(api, api->AddCustomOpDomain(options, mfqat::SharedDomain(api)));
  });
}
