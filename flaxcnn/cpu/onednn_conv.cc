// oneDNN's 2-D convolutions as XLA FFI handlers: float32 or bfloat16 (all three buffers of a
// call alike; bfloat16 runs on AMX or AVX-512 BF16 where the CPU has them, accumulating in
// float32), NHWC activations, HWIO kernels (flax.linen's layout), any strides, padding and
// kernel dilation. Built and registered by onednn_conv.py. Each handler runs one oneDNN
// primitive, created once per geometry and data type and kept.
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Dims = ffi::Span<const int64_t>;
using Tag = memory::format_tag;

namespace {

enum Kind { kForward, kBackwardData, kBackwardWeights };

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One convolution's shapes in oneDNN's terms (NCHW / OIHW dims, dilation counted from 0).
struct Geometry {
  memory::dims src, weights, dst, strides, dilation, pad_low, pad_high;
  memory::data_type type;

  // x: (N, H, W, C), w: (KH, KW, C, O), y: (N, OH, OW, O); padding: (lo, hi) per spatial dim.
  Geometry(Dims x, Dims w, Dims y, Dims strides_, Dims dilation_, Dims padding,
           memory::data_type type_)
      : src{x[0], x[3], x[1], x[2]},
        weights{w[3], w[2], w[0], w[1]},
        dst{y[0], y[3], y[1], y[2]},
        strides{strides_[0], strides_[1]},
        dilation{dilation_[0] - 1, dilation_[1] - 1},
        pad_low{padding[0], padding[2]},
        pad_high{padding[1], padding[3]},
        type(type_) {}

  bool operator<(const Geometry& o) const {
    return std::tie(src, weights, dst, strides, dilation, pad_low, pad_high, type) <
           std::tie(o.src, o.weights, o.dst, o.strides, o.dilation, o.pad_low, o.pad_high,
                    o.type);
  }
  memory::desc Activations(const memory::dims& dims) const { return {dims, type, Tag::nhwc}; }
  memory::desc AnyWeights() const { return {weights, type, Tag::any}; }
};

// A primitive with the memory it needs: its scratchpad, and the reorder between the
// user's HWIO kernel and the (blocked) weights layout oneDNN picks for speed. Scratchpads
// come from the calling thread (`Run`): XLA calls a handler from any of its threads, and
// oneDNN's own scratchpad is bound to the thread that created the primitive.
struct Convolution {
  dnnl::primitive primitive;
  memory::desc scratchpad, hwio, own_weights;
  dnnl::reorder reorder;  // HWIO -> own, or own -> HWIO for the weights gradient.
  memory::desc reorder_scratchpad;
};

template <typename Primitive>
void Keep(Convolution& conv, const typename Primitive::primitive_desc& pd,
          const memory::desc& own_weights) {
  conv.primitive = Primitive(pd);
  conv.scratchpad = pd.scratchpad_desc();
  conv.own_weights = own_weights;
}

std::unique_ptr<Convolution> Create(Kind kind, const Geometry& g) {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const auto src = g.Activations(g.src), dst = g.Activations(g.dst);
  const auto direct = dnnl::algorithm::convolution_direct;
  dnnl::convolution_forward::primitive_desc forward(
      Engine(), dnnl::prop_kind::forward_training, direct, src, g.AnyWeights(), dst, g.strides,
      g.dilation, g.pad_low, g.pad_high, attr);
  auto conv = std::make_unique<Convolution>();
  if (kind == kForward) {
    Keep<dnnl::convolution_forward>(*conv, forward, forward.weights_desc());
  } else if (kind == kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc pd(Engine(), direct, src, g.AnyWeights(), dst,
                                                       g.strides, g.dilation, g.pad_low,
                                                       g.pad_high, forward, attr);
    Keep<dnnl::convolution_backward_data>(*conv, pd, pd.weights_desc());
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(Engine(), direct, src, g.AnyWeights(),
                                                          dst, g.strides, g.dilation, g.pad_low,
                                                          g.pad_high, forward, attr);
    Keep<dnnl::convolution_backward_weights>(*conv, pd, pd.diff_weights_desc());
  }
  conv->hwio = memory::desc(g.weights, g.type, Tag::hwio);
  if (conv->own_weights != conv->hwio) {
    const bool to_hwio = kind == kBackwardWeights;
    const auto& from = to_hwio ? conv->own_weights : conv->hwio;
    const auto& to = to_hwio ? conv->hwio : conv->own_weights;
    dnnl::reorder::primitive_desc pd(Engine(), from, Engine(), to, attr);
    conv->reorder = dnnl::reorder(pd);
    conv->reorder_scratchpad = pd.scratchpad_desc();
  }
  return conv;
}

const Convolution& Lookup(Kind kind, const Geometry& g) {
  static std::mutex mutex;
  static std::map<std::pair<Kind, Geometry>, std::unique_ptr<Convolution>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto& slot = cache[{kind, g}];
  if (!slot) slot = Create(kind, g);
  return *slot;
}

void Execute(const dnnl::primitive& primitive, const memory::desc& scratchpad,
             const dnnl::stream& stream, std::unordered_map<int, memory> args) {
  thread_local std::vector<char> buffer;
  if (buffer.size() < scratchpad.get_size()) buffer.resize(scratchpad.get_size());
  args.insert({DNNL_ARG_SCRATCHPAD, memory(scratchpad, Engine(), buffer.data())});
  primitive.execute(stream, args);
}

// src/dst: the activations (or their gradients); weights: the HWIO kernel (or its gradient).
ffi::Error Run(Kind kind, const Geometry& g, void* src, void* weights, void* dst) {
  try {
    const Convolution& conv = Lookup(kind, g);
    dnnl::stream stream(Engine());
    memory src_m(g.Activations(g.src), Engine(), src), dst_m(g.Activations(g.dst), Engine(), dst);
    memory hwio(conv.hwio, Engine(), weights), own = hwio;
    const bool reordered = conv.own_weights != conv.hwio;
    if (reordered) own = memory(conv.own_weights, Engine());
    auto reorder = [&](memory& from, memory& to) {
      Execute(conv.reorder, conv.reorder_scratchpad, stream,
              {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}});
    };
    if (reordered && kind != kBackwardWeights) reorder(hwio, own);
    if (kind == kForward) {
      Execute(conv.primitive, conv.scratchpad, stream,
              {{DNNL_ARG_SRC, src_m}, {DNNL_ARG_WEIGHTS, own}, {DNNL_ARG_DST, dst_m}});
    } else if (kind == kBackwardData) {
      Execute(conv.primitive, conv.scratchpad, stream,
              {{DNNL_ARG_DIFF_SRC, src_m}, {DNNL_ARG_WEIGHTS, own}, {DNNL_ARG_DIFF_DST, dst_m}});
    } else {
      Execute(conv.primitive, conv.scratchpad, stream,
              {{DNNL_ARG_SRC, src_m}, {DNNL_ARG_DIFF_WEIGHTS, own}, {DNNL_ARG_DIFF_DST, dst_m}});
      if (reordered) reorder(own, hwio);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN convolution: ") + e.what());
  }
  return ffi::Error::Success();
}

using Buffer = ffi::AnyBuffer;
using Result = ffi::Result<ffi::AnyBuffer>;

// The handlers' buffers are float32 or bfloat16, all three alike (jax's ffi_call passes
// whatever it is given: onednn_conv.py only calls with these).
std::optional<memory::data_type> DataType(const Buffer& a, const Buffer& b, const Buffer& c) {
  const auto t = a.element_type();
  if (b.element_type() != t || c.element_type() != t) return std::nullopt;
  if (t == ffi::DataType::F32) return memory::data_type::f32;
  if (t == ffi::DataType::BF16) return memory::data_type::bf16;
  return std::nullopt;
}

// x: the input, w: the kernel, y: the output (or their gradients, as `kind` has them).
ffi::Error Convolve(Kind kind, const Buffer& x, const Buffer& w, const Buffer& y, Dims strides,
                    Dims dilation, Dims padding) {
  const auto type = DataType(x, w, y);
  if (!type) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "oneDNN convolution: buffers must all be float32 or all bfloat16");
  }
  Geometry g(x.dimensions(), w.dimensions(), y.dimensions(), strides, dilation, padding, *type);
  return Run(kind, g, x.untyped_data(), w.untyped_data(), y.untyped_data());
}

ffi::Error Forward(Buffer x, Buffer w, Result y, Dims strides, Dims dilation, Dims padding) {
  return Convolve(kForward, x, w, *y, strides, dilation, padding);
}

ffi::Error BackwardData(Buffer dy, Buffer w, Result dx, Dims strides, Dims dilation,
                        Dims padding) {
  return Convolve(kBackwardData, *dx, w, dy, strides, dilation, padding);
}

ffi::Error BackwardWeights(Buffer x, Buffer dy, Result dw, Dims strides, Dims dilation,
                           Dims padding) {
  return Convolve(kBackwardWeights, x, *dw, dy, strides, dilation, padding);
}

auto Signature() {
  return ffi::Ffi::Bind()
      .Arg<Buffer>()
      .Arg<Buffer>()
      .Ret<Buffer>()
      .Attr<Dims>("strides")
      .Attr<Dims>("dilation")
      .Attr<Dims>("padding");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(flaxcnn_conv_forward, Forward, Signature());
XLA_FFI_DEFINE_HANDLER_SYMBOL(flaxcnn_conv_backward_data, BackwardData, Signature());
XLA_FFI_DEFINE_HANDLER_SYMBOL(flaxcnn_conv_backward_weights, BackwardWeights, Signature());
