// The engine's loops in C++: the kernels of the densenet_efficient:: custom ops.
//
// This is a line-by-line translation of the Python reference engine
// (densenet_efficient/models/engine/): the same ATen calls in the same order, so the two agree to
// the last bit in float64 wherever the kernels are deterministic. What it removes is the Python
// interpreter around every call (about 15 us per op on a CPU), which bounds a training step
// whenever the kernels themselves are small (a fast GPU, small batches). Only ATen is called, so
// one source serves CPU and CUDA: ATen dispatches to cuDNN / CUDA kernels at run time.
//
// The op schemas are defined in Python (densenet_efficient/models/engine/ops.py) with their fake
// kernels and autograd formulas; this file only registers the CompositeExplicitAutograd kernels.
// The ops are functional: they never write a running statistic, they return the batch statistics
// and the (traced) Python caller applies nn.BatchNorm's update.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using at::TensorList;
using c10::ArrayRef;

constexpr std::array<bool, 3> kAllGrads{true, true, true};
constexpr std::array<bool, 3> kInputAndWeight{true, true, false};

// The ops receive their settings already resolved (the compute dtype included), so autocast must
// not cast inside them: the Python reference runs under `torch.autocast(enabled=False)`.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

at::ScalarType stat_dtype(at::ScalarType dtype) {
  // Batch statistics are kept in float32 at least (bf16/fp16 activations), as nn.BatchNorm does.
  return at::promote_types(dtype, at::kFloat);
}

Tensor as(const Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

at::MemoryFormat memory_format(const Tensor& x) {
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

// A BatchNorm2d's tensors as the op receives them; `running_*` may be stand-ins in training.
struct BN {
  Tensor weight, bias, running_mean, running_var;
  double eps;
};

// One reusable allocation for per-layer temporaries of up to `channels` channels (views into it:
// on CPU a fresh large tensor costs a page fault per 4 KiB when first written).
struct Scratch {
  Tensor flat, unused;
  int64_t n, h, w;
  at::MemoryFormat fmt;

  Scratch(const Tensor& like, int64_t channels, at::MemoryFormat fmt_)
      : n(like.size(0)), h(like.size(2)), w(like.size(3)), fmt(fmt_) {
    flat = at::empty({n * channels * h * w}, like.options());
    unused = at::empty({0}, like.options().dtype(stat_dtype(like.scalar_type())));
  }

  // A dense (n, channels, h, w) tensor in the block's format at the start: one view op.
  Tensor view(int64_t channels) const {
    TORCH_CHECK(n * channels * h * w <= flat.numel(), "scratch of ", flat.numel(), " elements asked for ", channels,
                " channels");
    if (fmt == at::MemoryFormat::ChannelsLast)
      return flat.as_strided({n, channels, h, w}, {h * w * channels, 1, w * channels, channels});
    return flat.as_strided({n, channels, h, w}, {channels * h * w, h * w, w, 1});
  }
};

// `(x - mean) / sqrt(var + eps) * weight + bias` with fixed statistics, into `out` (may be `x`).
Tensor& apply_bn(const Tensor& x, const BN& bn, const Tensor& mean, const Tensor& var, Tensor& out, Tensor& unused) {
  const auto dtype = mean.scalar_type();
  at::native_batch_norm_out(out, unused, unused, x, as(bn.weight, dtype), as(bn.bias, dtype), mean, as(var, dtype),
                            false, 0.0, bn.eps);
  return out;
}

// Training batch norm with the batch's own statistics: (out, mean, invstd, reserve). The kernel
// writes nn.BatchNorm's update with `momentum` into `rm`/`rv`: stand-ins, never the model's
// buffers (momentum 1 leaves exactly the batch mean and unbiased variance there; 0 leaves them).
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_train(const Tensor& x, const BN& bn, Tensor rm, Tensor rv,
                                                    double momentum) {
  const auto dtype = stat_dtype(x.scalar_type());
  return at::_batch_norm_with_update(x, as(bn.weight, dtype), as(bn.bias, dtype), rm, rv, momentum, bn.eps);
}

std::tuple<Tensor, Tensor, Tensor> bn_train_backward(const Tensor& grad, const Tensor& x, const BN& bn,
                                                     const Tensor& mean, const Tensor& invstd, const Tensor& reserve,
                                                     const Tensor& rm, const Tensor& rv) {
  auto [dx, dg, db] = at::batch_norm_backward(grad, x, as(bn.weight, mean.scalar_type()), rm, rv, mean, invstd, true,
                                              bn.eps, kAllGrads, reserve);
  return {dx, as(dg, bn.weight.scalar_type()), as(db, bn.weight.scalar_type())};
}

// Backward of a BN applied with fixed statistics: the block's shared batch statistics (training,
// `invstd` defined: the gradient flows through mean and variance) or the running ones (eval).
std::tuple<Tensor, Tensor, Tensor> bn_fixed_backward(const Tensor& grad, const Tensor& x, const BN& bn,
                                                     const Tensor& mean, const Tensor& var,
                                                     const std::optional<Tensor>& invstd) {
  const Tensor weight = as(bn.weight, mean.scalar_type());
  Tensor dx, dg, db;
  if (invstd) {
    std::tie(dx, dg, db) = at::native_batch_norm_backward(grad, x, weight, std::nullopt, std::nullopt, mean, *invstd,
                                                          true, bn.eps, kAllGrads);
  } else {
    std::tie(dx, dg, db) =
        at::native_batch_norm_backward(grad, x, weight, mean, var, std::nullopt, std::nullopt, false, bn.eps, kAllGrads);
  }
  return {dx, as(dg, bn.weight.scalar_type()), as(db, bn.weight.scalar_type())};
}

// Inference batch norm with the running statistics (one kernel).
Tensor bn_eval(const Tensor& x, const BN& bn) {
  const auto dtype = stat_dtype(x.scalar_type());
  return std::get<0>(at::native_batch_norm(x, as(bn.weight, dtype), as(bn.bias, dtype), as(bn.running_mean, dtype),
                                           as(bn.running_var, dtype), false, 0.0, bn.eps));
}

// [t.to(d) for t, d in zip(tensors, dtypes)] as one kernel (autocast's casts, a block at a time).
std::vector<Tensor> cast_all(TensorList tensors, const std::vector<at::ScalarType>& dtypes) {
  bool same = true;
  for (size_t i = 0; i < tensors.size(); ++i) same = same && tensors[i].scalar_type() == dtypes[i];
  if (same) return tensors.vec();
  std::vector<Tensor> out;
  out.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) out.push_back(at::empty_like(tensors[i], tensors[i].options().dtype(dtypes[i])));
  at::_foreach_copy_(out, tensors);
  return out;
}

// torchvision's dense-layer and transition convolutions: 1x1 "valid" and 3x3 "same", stride 1.
struct ConvSpec {
  std::array<int64_t, 2> padding;
};
constexpr ConvSpec kConv1x1{{0, 0}};
constexpr ConvSpec kConv3x3{{1, 1}};
constexpr std::array<int64_t, 2> kOnes{1, 1};
constexpr std::array<int64_t, 2> kZeros{0, 0};

Tensor conv(const Tensor& x, const Tensor& weight, const ConvSpec& spec) {
  return at::conv2d(x, weight, {}, kOnes, spec.padding, kOnes, 1);
}

std::tuple<Tensor, Tensor> conv_backward(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                         const ConvSpec& spec) {
  auto [gx, gw, unused] =
      at::convolution_backward(grad, x, weight, std::nullopt, kOnes, spec.padding, kOnes, false, kZeros, 1, kInputAndWeight);
  return {gx, gw};
}

// ReLU's backward written into `grad` itself (a temporary we own).
void relu_backward_(Tensor& grad, const Tensor& out) { at::threshold_backward_out(grad, grad, out, 0); }

// ---------------------------------------------------------------------------------------------
// Dense block.
// ---------------------------------------------------------------------------------------------

struct Layer {
  BN norm1, norm2;
  Tensor conv1, conv2;
  double drop;
};

std::vector<Layer> layers_of(TensorList params, TensorList running, ArrayRef<double> eps, ArrayRef<double> drop) {
  std::vector<Layer> layers;
  layers.reserve(drop.size());
  for (size_t i = 0; i < drop.size(); ++i) {
    const Tensor* p = params.data() + 6 * i;
    const Tensor* r = running.data() + 4 * i;
    layers.push_back(Layer{BN{p[0], p[1], r[0], r[1], eps[2 * i]}, BN{p[3], p[4], r[2], r[3], eps[2 * i + 1]}, p[2],
                           p[5], drop[i]});
  }
  return layers;
}

std::vector<Tensor> conv_weights(const std::vector<Layer>& layers, at::ScalarType dtype) {
  std::vector<Tensor> weights;
  for (const auto& layer : layers) {
    weights.push_back(layer.conv1);
    weights.push_back(layer.conv2);
  }
  return cast_all(weights, std::vector<at::ScalarType>(weights.size(), dtype));
}

// relu(norm1(buf[:, :c])) with fixed statistics, into the scratch. On CPU the inference kernel is
// 2-3x slower on a strided view than on a dense copy, so there (`copy`, the caller's choice per
// device) it normalises a dense copy in place (`dense`: the same channels already dense, the
// block's input for its first layer).
Tensor norm1_forward(const Tensor& buf, const BN& bn, const Tensor& mean, const Tensor& var, int64_t c,
                     Scratch& scratch, bool copy, const std::optional<Tensor>& dense) {
  Tensor out = scratch.view(c);
  Tensor x = dense ? *dense : buf.narrow(1, 0, c);
  if (!dense && copy) x = out.copy_(x);
  apply_bn(x, bn, mean, var, out, scratch.unused);
  return out.relu_();
}

// Forward of a dense block into one buffer. Returns (buffer, statistics rows [2, C] of the
// channels later layers normalise (mean, biased variance), their unbiased variances, norm2's batch
// statistics [2, L, k2] (mean, unbiased variance), kept bottlenecks, dropout masks).
std::tuple<Tensor, Tensor, Tensor, Tensor, std::vector<Tensor>, std::vector<Tensor>> dense_block(
    const Tensor& x, TensorList params, TensorList running, ArrayRef<double> eps, ArrayRef<double> drop,
    c10::List<bool> keep, bool training, bool graph, bool dense_copy, at::ScalarType dtype) {
  NoAutocast no_autocast;
  (void)graph;  // the caller already folded it into `keep`
  const auto layers = layers_of(params, running, eps, drop);
  const int64_t n = x.size(0), c0 = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t k = layers[0].conv2.size(0), L = static_cast<int64_t>(layers.size());
  const int64_t channels = c0 + k * L;
  const auto fmt = memory_format(x);
  const auto sdtype = stat_dtype(dtype);
  Tensor buf = at::empty({n, channels, h, w}, x.options().dtype(dtype).memory_format(fmt));
  buf.narrow(1, 0, c0).copy_(x);
  std::optional<Tensor> dense;
  if (x.scalar_type() == dtype && x.is_contiguous(fmt)) dense = x;
  const auto weights = conv_weights(layers, dtype);

  Tensor rows, unbiased, norm2_stats, dummy_mean, dummy_var;
  const double bessel = static_cast<double>(n * h * w) / std::max<int64_t>(n * h * w - 1, 1);
  if (training) {
    const int64_t k2 = layers[0].norm2.weight.size(0);
    rows = at::empty({2, channels - k}, x.options().dtype(sdtype));
    Tensor dummies = at::empty({2, std::max(channels - k, k2)}, x.options().dtype(sdtype));
    dummy_mean = dummies[0];
    dummy_var = dummies[1];
    norm2_stats = at::zeros({2, L, k2}, x.options().dtype(sdtype));
    // statistics of the block input, measured once for every layer that normalises them
    auto [mean, var] = at::batch_norm_update_stats(dense ? *dense : buf.narrow(1, 0, c0), dummy_mean.narrow(0, 0, c0),
                                                   dummy_var.narrow(0, 0, c0), 0.0);
    Tensor into = rows.narrow(1, 0, c0);
    at::stack_out(into, {mean, var}, 0);
  }

  std::vector<Tensor> kept, masks;
  Scratch scratch(buf, channels - k, fmt);
  for (int64_t i = 0; i < L; ++i) {
    const Layer& layer = layers[i];
    const int64_t c = c0 + i * k;
    Tensor z1;
    if (training) {
      z1 = norm1_forward(buf, layer.norm1, rows[0].narrow(0, 0, c), rows[1].narrow(0, 0, c), c, scratch, dense_copy,
                         i == 0 ? dense : std::nullopt);
    } else {
      z1 = norm1_forward(buf, layer.norm1, as(layer.norm1.running_mean, stat_dtype(layer.norm1.running_mean.scalar_type())),
                         as(layer.norm1.running_var, stat_dtype(layer.norm1.running_var.scalar_type())), c, scratch,
                         dense_copy, i == 0 ? dense : std::nullopt);
    }
    Tensor bottleneck = conv(z1, weights[2 * i], kConv1x1);
    z1.reset();
    Tensor z2 = training ? std::get<0>(bn_train(bottleneck, layer.norm2, norm2_stats[0][i], norm2_stats[1][i], 1.0))
                         : bn_eval(bottleneck, layer.norm2);
    Tensor y = conv(z2.relu_(), weights[2 * i + 1], kConv3x3);
    z2.reset();
    if (layer.drop > 0 && training) {
      Tensor mask;
      std::tie(y, mask) = at::native_dropout(y, layer.drop, true);
      masks.push_back(mask);
    }
    buf.narrow(1, c, k).copy_(y);
    if (training && i + 1 < L) {  // the last layer's channels feed no later layer
      auto [mean, var] = at::batch_norm_update_stats(y, dummy_mean.narrow(0, 0, k), dummy_var.narrow(0, 0, k), 0.0);
      Tensor into = rows.narrow(1, c, k);
      at::stack_out(into, {mean, var}, 0);
    }
    if (keep[i]) kept.push_back(bottleneck);
  }
  if (training) {
    unbiased = rows[1] * bessel;
  } else {
    rows = at::empty({0}, x.options().dtype(sdtype));
    unbiased = at::empty({0}, x.options().dtype(sdtype));
    norm2_stats = at::empty({0}, x.options().dtype(sdtype));
  }
  return {buf, rows, unbiased, norm2_stats, kept, masks};
}

// Reverse walk over the layers: (input gradient, parameter gradients in the op's parameter order).
std::tuple<Tensor, std::vector<Tensor>> dense_block_backward(
    const Tensor& grad, const Tensor& buf, const Tensor& rows, TensorList params, TensorList running, TensorList kept,
    TensorList masks, ArrayRef<double> eps, ArrayRef<double> drop, c10::List<bool> keep, bool training,
    bool dense_copy, at::ScalarType dtype, at::ScalarType input_dtype) {
  NoAutocast no_autocast;
  const auto layers = layers_of(params, running, eps, drop);
  const int64_t L = static_cast<int64_t>(layers.size());
  const int64_t k = layers[0].conv2.size(0);
  const int64_t c0 = buf.size(1) - k * L;
  const auto fmt = memory_format(buf);
  Tensor gbuf = grad.to(dtype).clone(fmt);  // the one gradient buffer, accumulated in place
  const auto weights = conv_weights(layers, dtype);

  Tensor invstd, dummy_mean, dummy_var;
  if (training) {
    bool one_eps = true;
    for (const auto& layer : layers) one_eps = one_eps && layer.norm1.eps == layers[0].norm1.eps;
    if (one_eps) {
      invstd = at::rsqrt(rows[1] + layers[0].norm1.eps);
    } else {
      std::vector<Tensor> per_layer;
      for (const auto& layer : layers) per_layer.push_back(at::rsqrt(rows[1] + layer.norm1.eps));
      invstd = at::stack(per_layer);  // [layer, channel]
    }
    const int64_t k2 = layers[0].norm2.weight.size(0);
    Tensor dummies = at::empty({2, std::max(rows.size(1), k2)}, rows.options());
    dummy_mean = dummies[0];
    dummy_var = dummies[1];
  }

  std::vector<Tensor> bottlenecks(L), drop_masks(L);
  for (int64_t i = 0, j = 0; i < L; ++i) {
    if (keep[i]) bottlenecks[i] = kept[j++];
  }
  for (int64_t i = 0, j = 0; i < L; ++i) {
    if (layers[i].drop > 0 && training) drop_masks[i] = masks[j++];
  }

  std::vector<Tensor> conv_grads(2 * L), bn_grads(4 * L);
  // z1 is dead (after its ReLU backward) before the dense copy of the input that BN backward
  // reads: one scratch serves both.
  Scratch scratch(buf, c0 + k * (L - 1), fmt);
  for (int64_t i = L - 1; i >= 0; --i) {
    const Layer& layer = layers[i];
    const int64_t c = c0 + i * k;
    Tensor dy = gbuf.narrow(1, c, k);
    if (drop_masks[i].defined()) dy = at::native_dropout_backward(dy, drop_masks[i], 1.0 / (1.0 - layer.drop));
    Tensor mean1, var1;
    std::optional<Tensor> invstd1;
    if (training) {
      mean1 = rows[0].narrow(0, 0, c);
      var1 = rows[1].narrow(0, 0, c);
      invstd1 = invstd.dim() == 1 ? invstd.narrow(0, 0, c) : invstd[i].narrow(0, 0, c);
    } else {
      mean1 = as(layer.norm1.running_mean, stat_dtype(layer.norm1.running_mean.scalar_type()));
      var1 = as(layer.norm1.running_var, stat_dtype(layer.norm1.running_var.scalar_type()));
    }
    Tensor z1 = norm1_forward(buf, layer.norm1, mean1, var1, c, scratch, dense_copy, std::nullopt);
    Tensor bottleneck = std::move(bottlenecks[i]);
    if (!bottleneck.defined()) bottleneck = conv(z1, weights[2 * i], kConv1x1);  // not kept: recompute
    Tensor z2, mean2, invstd2, reserve;
    if (training) {
      std::tie(z2, mean2, invstd2, reserve) = bn_train(bottleneck, layer.norm2, dummy_mean.narrow(0, 0, bottleneck.size(1)),
                                                       dummy_var.narrow(0, 0, bottleneck.size(1)), 0.0);
    } else {
      z2 = bn_eval(bottleneck, layer.norm2);
    }
    z2.relu_();
    auto [dz2, gw2] = conv_backward(dy, z2, weights[2 * i + 1], kConv3x3);
    dy.reset();
    relu_backward_(dz2, z2);
    z2.reset();
    Tensor db, dg2, dbeta2;
    if (training) {
      std::tie(db, dg2, dbeta2) = bn_train_backward(dz2, bottleneck, layer.norm2, mean2, invstd2, reserve,
                                                     dummy_mean.narrow(0, 0, bottleneck.size(1)),
                                                     dummy_var.narrow(0, 0, bottleneck.size(1)));
    } else {
      const auto sd = stat_dtype(layer.norm2.running_mean.scalar_type());
      std::tie(db, dg2, dbeta2) = bn_fixed_backward(dz2, bottleneck, layer.norm2, as(layer.norm2.running_mean, sd),
                                                     as(layer.norm2.running_var, sd), std::nullopt);
    }
    dz2.reset();
    bottleneck.reset();
    auto [dz1, gw1] = conv_backward(db, z1, weights[2 * i], kConv1x1);
    db.reset();
    relu_backward_(dz1, z1);
    z1.reset();
    Tensor input = scratch.view(c).copy_(buf.narrow(1, 0, c));  // dense: 2x faster on CPU, fused on CUDA
    auto [dx, dg1, dbeta1] = bn_fixed_backward(dz1, input, layer.norm1, mean1, var1, invstd1);
    dz1.reset();
    gbuf.narrow(1, 0, c).add_(dx);
    conv_grads[2 * i] = gw1;
    conv_grads[2 * i + 1] = gw2;
    bn_grads[4 * i] = dg1;
    bn_grads[4 * i + 1] = dbeta1;
    bn_grads[4 * i + 2] = dg2;
    bn_grads[4 * i + 3] = dbeta2;
  }
  std::vector<at::ScalarType> param_dtypes;
  for (const auto& layer : layers) {
    param_dtypes.push_back(layer.conv1.scalar_type());
    param_dtypes.push_back(layer.conv2.scalar_type());
  }
  conv_grads = cast_all(conv_grads, param_dtypes);
  std::vector<Tensor> param_grads;
  param_grads.reserve(6 * L);
  for (int64_t i = 0; i < L; ++i) {
    param_grads.insert(param_grads.end(), {bn_grads[4 * i], bn_grads[4 * i + 1], conv_grads[2 * i],
                                           bn_grads[4 * i + 2], bn_grads[4 * i + 3], conv_grads[2 * i + 1]});
  }
  return {as(gbuf.narrow(1, 0, c0), input_dtype), param_grads};
}

// ---------------------------------------------------------------------------------------------
// Tails: tail(relu(norm(x))) for a transition (avg-pool then 1x1 conv), the ImageNet stem
// (max-pool) and the final norm5 (nothing).
// ---------------------------------------------------------------------------------------------

struct Pool {
  std::array<int64_t, 2> kernel, stride, padding, dilation;
  bool ceil;
};

Pool pool_of(int64_t kernel, int64_t stride, int64_t padding, int64_t dilation, bool ceil) {
  return Pool{{kernel, kernel}, {stride, stride}, {padding, padding}, {dilation, dilation}, ceil};
}

constexpr std::array<int64_t, 2> kTwos{2, 2};

// Returns (out, kept, stats): `kept` what the tail's backward reads instead of recomputing
// (`keep`), `stats` in training [batch statistics [2, C] (mean, unbiased variance)] plus, when
// kept, [mean, invstd, reserve] for the backward kernel.
std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> norm_relu_tail(
    const Tensor& x_in, TensorList bn_tensors, const std::optional<Tensor>& conv_weight, c10::string_view kind,
    int64_t pool_kernel, int64_t pool_stride, int64_t pool_padding, int64_t pool_dilation, bool pool_ceil, double eps,
    bool training, bool keep, at::ScalarType dtype) {
  NoAutocast no_autocast;
  const BN bn{bn_tensors[0], bn_tensors[1], bn_tensors[2], bn_tensors[3], eps};
  const Tensor x = as(x_in, dtype);
  Tensor z;
  std::vector<Tensor> kept, stats;
  if (training) {
    Tensor batch = at::zeros({2, x.size(1)}, x.options().dtype(stat_dtype(dtype)));
    auto [out, mean, invstd, reserve] = bn_train(x, bn, batch[0], batch[1], 1.0);
    z = out;
    stats.push_back(batch);
    if (keep) stats.insert(stats.end(), {mean, invstd, reserve});
  } else {
    z = bn_eval(x, bn);
  }
  z.relu_();
  Tensor out;
  if (kind == "transition") {
    const Tensor weight = as(*conv_weight, dtype);
    out = conv(at::avg_pool2d(z, kTwos, kTwos), weight, kConv1x1);  // pool then conv: they commute
  } else if (kind == "stem") {
    const Pool p = pool_of(pool_kernel, pool_stride, pool_padding, pool_dilation, pool_ceil);
    if (keep) {
      Tensor idx;
      std::tie(out, idx) = at::max_pool2d_with_indices(z, p.kernel, p.stride, p.padding, p.dilation, p.ceil);
      kept = {idx, out > 0};  // at the max position relu's mask is the pooled value's sign
    } else {
      out = at::max_pool2d(z, p.kernel, p.stride, p.padding, p.dilation, p.ceil);
    }
  } else {
    out = z;  // norm5: the caller saves the output itself (an op may not return it twice)
  }
  return {out, kept, stats};
}

// (dx in x's dtype, dweight, dbias, [dconv_weight] for a transition).
std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> norm_relu_tail_backward(
    const Tensor& grad_in, const Tensor& x_in, TensorList bn_tensors, const std::optional<Tensor>& conv_weight,
    TensorList kept, TensorList stats, c10::string_view kind, int64_t pool_kernel, int64_t pool_stride,
    int64_t pool_padding, int64_t pool_dilation, bool pool_ceil, double eps, bool training, at::ScalarType dtype) {
  NoAutocast no_autocast;
  const BN bn{bn_tensors[0], bn_tensors[1], bn_tensors[2], bn_tensors[3], eps};
  const Tensor x = as(x_in, dtype);
  const Tensor grad = as(grad_in, dtype);
  const auto sdtype = stat_dtype(x.scalar_type());
  Tensor dummies = at::empty({2, x.size(1)}, x.options().dtype(sdtype));
  Tensor rm = dummies[0], rv = dummies[1];
  const Pool p = pool_of(pool_kernel, pool_stride, pool_padding, pool_dilation, pool_ceil);
  Tensor dz, mean, invstd, reserve;
  std::vector<Tensor> extra;
  if (!kept.empty() && kind == "stem") {  // "efficient": mask by relu's sign, scatter to the max positions
    dz = at::max_pool2d_with_indices_backward(grad * kept[1], x, p.kernel, p.stride, p.padding, p.dilation, p.ceil,
                                              kept[0]);
  } else if (!kept.empty()) {  // norm5 kept its output, as naive's in-place ReLU does
    dz = at::threshold_backward(grad, kept[0], 0);
  } else {
    Tensor z;
    if (training) {
      std::tie(z, mean, invstd, reserve) = bn_train(x, bn, rm, rv, 0.0);
    } else {
      z = bn_eval(x, bn);
    }
    z.relu_();
    if (kind == "transition") {
      const Tensor weight = as(*conv_weight, dtype);
      const Tensor pooled = at::avg_pool2d(z, kTwos, kTwos);
      auto [dpooled, dw] = conv_backward(grad, pooled, weight, kConv1x1);
      dz = at::avg_pool2d_backward(dpooled, z, kTwos, kTwos, kZeros, false, true, std::nullopt);
      extra.push_back(as(dw, conv_weight->scalar_type()));
    } else if (kind == "stem") {
      auto [unused, idx] = at::max_pool2d_with_indices(z, p.kernel, p.stride, p.padding, p.dilation, p.ceil);
      dz = at::max_pool2d_with_indices_backward(grad, z, p.kernel, p.stride, p.padding, p.dilation, p.ceil, idx);
    } else {
      dz = grad.clone(memory_format(x));  // relu's backward writes into it
    }
    relu_backward_(dz, z);
  }
  Tensor dx, dg, dbeta;
  if (training) {
    if (!mean.defined()) {  // kept: the forward's [mean, invstd, reserve]
      mean = stats[0];
      invstd = stats[1];
      reserve = stats[2];
    }
    std::tie(dx, dg, dbeta) = bn_train_backward(dz, x, bn, mean, invstd, reserve, rm, rv);
  } else {
    const auto sd = stat_dtype(bn.running_mean.scalar_type());
    std::tie(dx, dg, dbeta) = bn_fixed_backward(dz, x, bn, as(bn.running_mean, sd), as(bn.running_var, sd), std::nullopt);
  }
  return {as(dx, x_in.scalar_type()), dg, dbeta, extra};
}

// ---------------------------------------------------------------------------------------------
// Autograd: the ops' derivative formulas, in C++ so an eager step never enters Python between
// its block calls. Each forward and backward calls the ops through the dispatcher (below
// autograd), so under torch.compile the compiler sees the ops themselves (with their Python fake
// kernels) in the forward and the backward graph.
// ---------------------------------------------------------------------------------------------

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Fn>
c10::TypedOperatorHandle<Fn> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

std::vector<Tensor> slice(const variable_list& v, size_t begin, size_t count) {
  return std::vector<Tensor>(v.begin() + begin, v.begin() + begin + count);
}

struct DenseBlockFunction : public torch::autograd::Function<DenseBlockFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, TensorList params, TensorList running,
                               ArrayRef<double> eps, ArrayRef<double> drop, c10::List<bool> keep, bool training,
                               bool graph, bool dense_copy, at::ScalarType dtype) {
    static auto op = op_handle<decltype(dense_block)>("densenet_efficient::dense_block");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [buf, rows, unbiased, norm2, kept, masks] =
        op.call(x, params, running, eps, drop, keep, training, graph, dense_copy, dtype);
    variable_list saved{buf, rows};
    saved.insert(saved.end(), params.begin(), params.end());
    if (!training) saved.insert(saved.end(), running.begin(), running.end());  // eval reads them: version-checked
    saved.insert(saved.end(), kept.begin(), kept.end());
    saved.insert(saved.end(), masks.begin(), masks.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["eps"] = std::vector<double>(eps.begin(), eps.end());
    ctx->saved_data["drop"] = std::vector<double>(drop.begin(), drop.end());
    ctx->saved_data["keep"] = keep;
    ctx->saved_data["training"] = training;
    ctx->saved_data["dense_copy"] = dense_copy;
    ctx->saved_data["dtype"] = dtype;
    ctx->saved_data["input_dtype"] = x.scalar_type();
    ctx->saved_data["counts"] = std::vector<int64_t>{static_cast<int64_t>(params.size()), static_cast<int64_t>(running.size()),
                                                     static_cast<int64_t>(kept.size())};
    variable_list out{buf, rows, unbiased, norm2};
    out.insert(out.end(), kept.begin(), kept.end());
    out.insert(out.end(), masks.begin(), masks.end());
    ctx->mark_non_differentiable(slice(out, 1, out.size() - 1));
    ctx->set_materialize_grads(false);  // no zero gradients for the statistics and kept tensors
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<decltype(dense_block_backward)>("densenet_efficient::dense_block_backward");
    const auto saved = ctx->get_saved_variables();
    const auto counts = ctx->saved_data["counts"].toIntVector();
    const bool training = ctx->saved_data["training"].toBool();
    const size_t n_params = counts[0], n_running = counts[1], n_kept = counts[2];
    if (!grads[0].defined()) return variable_list(1 + n_params + n_running + 7);  // output unused: zero gradients
    size_t at = 2;
    const auto params = slice(saved, at, n_params);
    at += n_params;
    // training never reads the running statistics: stand-ins keep the layer layout
    std::vector<Tensor> running = training ? std::vector<Tensor>(n_running, saved[1]) : slice(saved, at, n_running);
    if (!training) at += n_running;
    const auto kept = slice(saved, at, n_kept);
    at += n_kept;
    const auto masks = slice(saved, at, saved.size() - at);
    auto [gx, param_grads] =
        op.call(grads[0], saved[0], saved[1], params, running, kept, masks, ctx->saved_data["eps"].toDoubleVector(),
                ctx->saved_data["drop"].toDoubleVector(), ctx->saved_data["keep"].toBoolList(), training,
                ctx->saved_data["dense_copy"].toBool(), ctx->saved_data["dtype"].toScalarType(),
                ctx->saved_data["input_dtype"].toScalarType());
    // one gradient per input: x, each parameter, each running buffer, then the seven settings
    variable_list out{gx};
    out.insert(out.end(), param_grads.begin(), param_grads.end());
    out.resize(out.size() + n_running + 7);
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, std::vector<Tensor>, std::vector<Tensor>> dense_block_autograd(
    const Tensor& x, TensorList params, TensorList running, ArrayRef<double> eps, ArrayRef<double> drop,
    c10::List<bool> keep, bool training, bool graph, bool dense_copy, at::ScalarType dtype) {
  auto out = DenseBlockFunction::apply(x, params, running, eps, drop, keep, training, graph, dense_copy, dtype);
  const size_t n_kept = std::count(keep.begin(), keep.end(), true);
  return {out[0], out[1], out[2], out[3], slice(out, 4, n_kept), slice(out, 4 + n_kept, out.size() - 4 - n_kept)};
}

struct TailFunction : public torch::autograd::Function<TailFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, TensorList bn,
                               const std::optional<Tensor>& conv_weight, c10::string_view kind, int64_t pool_kernel,
                               int64_t pool_stride, int64_t pool_padding, int64_t pool_dilation, bool pool_ceil,
                               double eps, bool training, bool keep, at::ScalarType dtype) {
    static auto op = op_handle<decltype(norm_relu_tail)>("densenet_efficient::norm_relu_tail");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, kept, stats] = op.call(x, bn, conv_weight, kind, pool_kernel, pool_stride, pool_padding, pool_dilation,
                                      pool_ceil, eps, training, keep, dtype);
    const bool identity = kind == "identity";
    variable_list saved{x, bn[0], bn[1]};
    if (conv_weight) saved.push_back(*conv_weight);
    if (identity && keep) saved.push_back(out);  // norm5 keeps its output (an op may not return it twice)
    saved.insert(saved.end(), kept.begin(), kept.end());
    const size_t n_kept = (identity && keep) ? 1 : kept.size();
    if (training && keep) {
      saved.insert(saved.end(), stats.begin() + 1, stats.end());  // the backward kernel's mean, invstd, reserve
    } else if (!training) {
      saved.insert(saved.end(), {bn[2], bn[3]});  // eval reads the running statistics: version-checked
    }
    ctx->save_for_backward(saved);
    ctx->saved_data["settings"] = std::vector<int64_t>{pool_kernel, pool_stride, pool_padding, pool_dilation, pool_ceil,
                                                       training, conv_weight.has_value(), static_cast<int64_t>(n_kept)};
    ctx->saved_data["kind"] = std::string(kind);
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["dtype"] = dtype;
    variable_list result{out};
    result.insert(result.end(), kept.begin(), kept.end());
    result.insert(result.end(), stats.begin(), stats.end());
    ctx->mark_non_differentiable(slice(result, 1, result.size() - 1));
    ctx->set_materialize_grads(false);  // see DenseBlockFunction
    return result;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<decltype(norm_relu_tail_backward)>("densenet_efficient::norm_relu_tail_backward");
    const auto saved = ctx->get_saved_variables();
    const auto s = ctx->saved_data["settings"].toIntVector();
    const bool training = s[5], has_conv = s[6];
    const size_t n_kept = s[7];
    size_t at = 3;
    std::optional<Tensor> conv_weight;
    if (has_conv) conv_weight = saved[at++];
    const auto kept = slice(saved, at, n_kept);
    at += n_kept;
    const auto rest = slice(saved, at, saved.size() - at);
    // training: stand-ins for the running statistics (never read); eval: the saved running ones
    std::vector<Tensor> bn{saved[1], saved[2]};
    if (training) {
      bn.insert(bn.end(), {saved[1], saved[1]});
    } else {
      bn.insert(bn.end(), rest.begin(), rest.end());
    }
    const std::vector<Tensor> stats = training ? rest : std::vector<Tensor>{};
    const auto kind = ctx->saved_data["kind"].toStringRef();
    if (!grads[0].defined()) return variable_list(16);  // output unused: zero gradients
    auto [dx, dg, dbeta, extra] = op.call(grads[0], saved[0], bn, conv_weight, kept, stats, kind, s[0], s[1], s[2], s[3],
                                          s[4], ctx->saved_data["eps"].toDouble(), training,
                                          ctx->saved_data["dtype"].toScalarType());
    // one gradient per input: x, bn's four tensors, conv_weight, then the ten settings
    variable_list out{dx, dg, dbeta, Tensor(), Tensor(), has_conv ? extra[0] : Tensor()};
    out.resize(out.size() + 10);
    return out;
  }
};

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> norm_relu_tail_autograd(
    const Tensor& x, TensorList bn, const std::optional<Tensor>& conv_weight, c10::string_view kind,
    int64_t pool_kernel, int64_t pool_stride, int64_t pool_padding, int64_t pool_dilation, bool pool_ceil, double eps,
    bool training, bool keep, at::ScalarType dtype) {
  auto out = TailFunction::apply(x, bn, conv_weight, kind, pool_kernel, pool_stride, pool_padding, pool_dilation,
                                 pool_ceil, eps, training, keep, dtype);
  const size_t n_kept = (kind == "stem" && keep) ? 2 : 0;
  return {out[0], slice(out, 1, n_kept), slice(out, 1 + n_kept, out.size() - 1 - n_kept)};
}

// The backward ops are differentiable once: their results carry a node that refuses a second
// differentiation (what Python's @once_differentiable does).
struct OnceDifferentiable : public torch::autograd::Function<OnceDifferentiable> {
  static variable_list forward(AutogradContext* ctx, variable_list results, TensorList inputs) {
    (void)ctx;
    (void)inputs;
    return results;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(false,
                "the memory-efficient engine's backward is differentiable once: it cannot differentiate twice (double backward); "
                "use memory_efficient=False for higher-order gradients");
    return {};
  }
};

variable_list once_differentiable(const variable_list& results, TensorList inputs) {
  if (!torch::autograd::GradMode::is_enabled()) return results;
  bool any = false;
  for (const auto& t : inputs) any = any || (t.defined() && t.requires_grad());
  if (!any) return results;
  variable_list detached;
  for (const auto& r : results) detached.push_back(r.defined() ? r.detach() : r);
  return OnceDifferentiable::apply(detached, inputs);
}

std::tuple<Tensor, std::vector<Tensor>> dense_block_backward_autograd(
    const Tensor& grad, const Tensor& buf, const Tensor& rows, TensorList params, TensorList running, TensorList kept,
    TensorList masks, ArrayRef<double> eps, ArrayRef<double> drop, c10::List<bool> keep, bool training,
    bool dense_copy, at::ScalarType dtype, at::ScalarType input_dtype) {
  static auto op = op_handle<decltype(dense_block_backward)>("densenet_efficient::dense_block_backward");
  std::tuple<Tensor, std::vector<Tensor>> result;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    result = op.call(grad, buf, rows, params, running, kept, masks, eps, drop, keep, training, dense_copy, dtype,
                     input_dtype);
  }
  variable_list flat{std::get<0>(result)};
  flat.insert(flat.end(), std::get<1>(result).begin(), std::get<1>(result).end());
  std::vector<Tensor> inputs{grad, buf};
  inputs.insert(inputs.end(), params.begin(), params.end());
  flat = once_differentiable(flat, inputs);
  return {flat[0], slice(flat, 1, flat.size() - 1)};
}

std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> norm_relu_tail_backward_autograd(
    const Tensor& grad, const Tensor& x, TensorList bn, const std::optional<Tensor>& conv_weight, TensorList kept,
    TensorList stats, c10::string_view kind, int64_t pool_kernel, int64_t pool_stride, int64_t pool_padding,
    int64_t pool_dilation, bool pool_ceil, double eps, bool training, at::ScalarType dtype) {
  static auto op = op_handle<decltype(norm_relu_tail_backward)>("densenet_efficient::norm_relu_tail_backward");
  std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> result;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    result = op.call(grad, x, bn, conv_weight, kept, stats, kind, pool_kernel, pool_stride, pool_padding,
                     pool_dilation, pool_ceil, eps, training, dtype);
  }
  auto& [dx, dg, dbeta, extra] = result;
  variable_list flat{dx, dg, dbeta};
  flat.insert(flat.end(), extra.begin(), extra.end());
  std::vector<Tensor> inputs{grad, x, bn[0], bn[1]};
  if (conv_weight) inputs.push_back(*conv_weight);
  flat = once_differentiable(flat, inputs);
  return {flat[0], flat[1], flat[2], slice(flat, 3, flat.size() - 3)};
}

}  // namespace

TORCH_LIBRARY_IMPL(densenet_efficient, CompositeExplicitAutograd, m) {
  m.impl("dense_block", &dense_block);
  m.impl("dense_block_backward", &dense_block_backward);
  m.impl("norm_relu_tail", &norm_relu_tail);
  m.impl("norm_relu_tail_backward", &norm_relu_tail_backward);
}

TORCH_LIBRARY_IMPL(densenet_efficient, Autograd, m) {
  m.impl("dense_block", &dense_block_autograd);
  m.impl("dense_block_backward", &dense_block_backward_autograd);
  m.impl("norm_relu_tail", &norm_relu_tail_autograd);
  m.impl("norm_relu_tail_backward", &norm_relu_tail_backward_autograd);
}
