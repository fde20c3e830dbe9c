// Training-mode BatchNorm + activation for channels-last float32 maps on the CPU, fused.
//
// PyTorch runs the statistics, the normalisation and the activation as separate passes, keeps
// the norm's output for the activation's backward, and its channels-last BN backward is slower
// than its NCHW one. Here the forward is one pass for the statistics and one that writes
// act(x * scale + shift) straight into the (possibly padded) output; the backward recomputes the
// activation's input from the norm's input, so it needs neither a stored norm output nor a
// separate activation pass. Loaded through ctypes by detector/layers/cpu_kernels.py; the
// threads are PyTorch's own (at::parallel_for), so torch.set_num_threads applies.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

enum Activation : int { kIdentity = 0, kRelu = 1, kSilu = 2 };

// exp for the channel loops, written so that gcc vectorizes them (Cephes' expf: reduction by
// ln 2 and a degree-5 polynomial, about 1 ulp). A NaN input stays NaN in the callers, whose
// results are products with z.
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  // round to nearest through a truncating conversion: with std::floor gcc emits a much slower
  // loop
  const float t = x * 1.44269504088896341f;
  const float n = static_cast<float>(static_cast<int32_t>(t + (t >= 0.0f ? 0.5f : -0.5f)));
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

template <int kAct>
inline float activate(float z) {
  if (kAct == kSilu) return z / (1.0f + fast_exp(-z));
  if (kAct == kRelu) return z < 0.0f ? 0.0f : z;  // NaN stays NaN, as in torch.relu
  return z;
}

// g * d act(z) / dz
template <int kAct>
inline float activation_grad(float g, float z) {
  if (kAct == kSilu) {
    const float s = 1.0f / (1.0f + fast_exp(-z));
    return g * s * (1.0f + z * (1.0f - s));
  }
  if (kAct == kRelu) return z <= 0.0f ? 0.0f : g;  // at NaN passes g, as torch's backward
  return g;
}

// The loops run over groups of pixels, each group at least kGroupFloats long, against
// per-channel coefficients repeated to the group's length: long, flat, vectorized loops even for
// few channels (a loop over the channels of one pixel is 2 vectors long at 32 channels).
constexpr int64_t kGroupFloats = 256;

inline int64_t group_pixels(int64_t c) { return std::max<int64_t>(1, (kGroupFloats + c - 1) / c); }

// `values` (c floats, or doubles) repeated `times` times, as floats.
template <typename T>
std::vector<float> repeated(const T* values, int64_t c, int64_t times) {
  std::vector<float> out(c * times);
  for (int64_t i = 0; i < times; ++i)
    for (int64_t k = 0; k < c; ++k) out[i * c + k] = static_cast<float>(values[k]);
  return out;
}

// Adds the per-channel sums of a group-repeated accumulator (length m * c) to `total`.
inline void fold_into(const float* acc, int64_t c, int64_t m, double* total) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t k = 0; k < c; ++k) total[k] += acc[i * c + k];
}

// Runs fn(part, begin, end) over `parts` contiguous slices of [0, n), in PyTorch's threads.
template <typename F>
void for_parts(int64_t n, int64_t parts, const F& fn) {
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t begin = n * p / parts, end = n * (p + 1) / parts;
      if (begin < end) fn(p, begin, end);
    }
  });
}

int64_t num_parts(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
}

// Per-channel sums a and b of two quantities over `units` (rows of the map, or blocks of rows),
// in PyTorch's threads: add_unit(unit, acc_a, acc_b) adds one unit's values to two
// group-repeated float accumulators (m * c each, zero at the start of each unit), which are then
// folded into double totals: float over a unit, double beyond.
template <typename AddUnit>
void sum_per_channel(int64_t units, int64_t c, int64_t m, double* a, double* b,
                     const AddUnit& add_unit) {
  const int64_t parts = num_parts(units);
  std::vector<double> partial(parts * 2 * c, 0.0);  // (parts, 2, c)
  for_parts(units, parts, [&](int64_t p, int64_t begin, int64_t end) {
    std::vector<float> acc(2 * m * c);
    double* total = partial.data() + p * 2 * c;
    for (int64_t unit = begin; unit < end; ++unit) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      add_unit(unit, acc.data(), acc.data() + m * c);
      fold_into(acc.data(), c, m, total);
      fold_into(acc.data() + m * c, c, m, total + c);
    }
  });
  std::fill(a, a + c, 0.0);
  std::fill(b, b + c, 0.0);
  for (int64_t p = 0; p < parts; ++p) {
    for (int64_t k = 0; k < c; ++k) {
      a[k] += partial[p * 2 * c + k];
      b[k] += partial[p * 2 * c + c + k];
    }
  }
}

// One group's part of moments (restrict parameters: gcc vectorizes it, see reduce_group).
inline void moments_group(const float* __restrict x, const float* __restrict shift, int64_t len,
                          float* __restrict sum, float* __restrict sum_sq) {
  for (int64_t j = 0; j < len; ++j) {
    const float d = x[j] - shift[j];
    sum[j] += d;
    sum_sq[j] += d * d;
  }
}

// Per-channel mean and biased variance of a (rows, c) row-major map in one pass: sums of d and
// d^2 with d = x - (the map's first row), in float over a block of `row_block` rows and in
// double beyond. Shifted by one of the map's own values, the variance keeps the digits that
// E[x^2] - E[x]^2 loses when the mean is large against the spread.
void moments(const float* x, int64_t rows, int64_t c, int64_t row_block, double* mean,
             double* var) {
  const int64_t m = group_pixels(c);
  const std::vector<float> shift = repeated(x, c, m);
  std::vector<double> sum(c), sum_sq(c);
  sum_per_channel((rows + row_block - 1) / row_block, c, m, sum.data(), sum_sq.data(),
                  [&](int64_t block, float* acc_sum, float* acc_sum_sq) {
                    const int64_t r_end = std::min(rows, (block + 1) * row_block);
                    for (int64_t r0 = block * row_block; r0 < r_end; r0 += m)
                      moments_group(x + r0 * c, shift.data(), (std::min(r_end, r0 + m) - r0) * c,
                                    acc_sum, acc_sum_sq);
                  });
  for (int64_t k = 0; k < c; ++k) {
    const double shifted_mean = sum[k] / static_cast<double>(rows);
    mean[k] = x[k] + shifted_mean;
    const double v = sum_sq[k] / static_cast<double>(rows) - shifted_mean * shifted_mean;
    var[k] = v < 0.0 ? 0.0 : v;  // rounding can make it negative; NaN stays NaN
  }
}

// The affine map the norm applies, from the saved statistics: the forward and the backward
// compute it identically, so the backward sees the forward's z bit for bit.
void norm_affine(const float* weight, const float* bias, const float* mean, const float* invstd,
                 int64_t c, float* scale, float* shift) {
  for (int64_t k = 0; k < c; ++k) {
    scale[k] = weight[k] * invstd[k];
    shift[k] = bias[k] - mean[k] * scale[k];
  }
}

// out[n, h, w, :] = act(x * scale + shift); x is (n, h, w, c) contiguous, out strided over n, h.
template <int kAct>
void apply_forward(const float* x, int64_t n, int64_t h, int64_t w, int64_t c,
                   const float* scale, const float* shift, float* out, int64_t out_stride_n,
                   int64_t out_stride_h) {
  const int64_t m = group_pixels(c);
  const std::vector<float> sc_rep = repeated(scale, c, m), sh_rep = repeated(shift, c, m);
  at::parallel_for(0, n * h, 1, [&](int64_t l0, int64_t l1) {
    const float* __restrict sc = sc_rep.data();
    const float* __restrict sh = sh_rep.data();
    for (int64_t line = l0; line < l1; ++line) {
      const float* src = x + line * w * c;
      float* dst = out + (line / h) * out_stride_n + (line % h) * out_stride_h;
      for (int64_t i0 = 0; i0 < w; i0 += m) {
        const float* __restrict s = src + i0 * c;
        float* __restrict d = dst + i0 * c;
        const int64_t len = (std::min(w, i0 + m) - i0) * c;
        for (int64_t j = 0; j < len; ++j) d[j] = activate<kAct>(s[j] * sc[j] + sh[j]);
      }
    }
  });
}

// One group's part of backward_reduce (a function of its own: with restrict parameters gcc
// vectorizes it, inside the lambda it did not).
template <int kAct>
inline void reduce_group(const float* __restrict g, const float* __restrict x,
                         float* __restrict dz_out, int64_t len, const float* __restrict scale,
                         const float* __restrict shift, const float* __restrict mean,
                         float* __restrict acc_dz, float* __restrict acc_dz_xmu) {
  for (int64_t j = 0; j < len; ++j) {
    const float dz = activation_grad<kAct>(g[j], x[j] * scale[j] + shift[j]);
    if (kAct != kIdentity) dz_out[j] = dz;
    acc_dz[j] += dz;
    acc_dz_xmu[j] += dz * (x[j] - mean[j]);
  }
}

// Sums of dz and dz * (x - mean) per channel (in float over a row of the map, double beyond),
// dz = g * act'(x * scale + shift); dz is written to dz_out (contiguous) unless the activation
// is the identity.
template <int kAct>
void backward_reduce(const float* g, int64_t g_stride_n, int64_t g_stride_h, const float* x,
                     int64_t n, int64_t h, int64_t w, int64_t c, const float* scale,
                     const float* shift, const float* mean, double* sum_dz, double* sum_dz_xmu,
                     float* dz_out) {
  const int64_t m = group_pixels(c);
  const std::vector<float> sc_rep = repeated(scale, c, m), sh_rep = repeated(shift, c, m),
                           mu_rep = repeated(mean, c, m);
  sum_per_channel(n * h, c, m, sum_dz, sum_dz_xmu,
                  [&](int64_t line, float* acc_dz, float* acc_dz_xmu) {
                    const float* xs = x + line * w * c;
                    const float* gs = g + (line / h) * g_stride_n + (line % h) * g_stride_h;
                    float* ds = kAct != kIdentity ? dz_out + line * w * c : nullptr;
                    for (int64_t i0 = 0; i0 < w; i0 += m) {
                      float* dp = kAct != kIdentity ? ds + i0 * c : nullptr;
                      reduce_group<kAct>(gs + i0 * c, xs + i0 * c, dp,
                                         (std::min(w, i0 + m) - i0) * c, sc_rep.data(),
                                         sh_rep.data(), mu_rep.data(), acc_dz, acc_dz_xmu);
                    }
                  });
}

// grad_x = dz * coef_dz + (x - mean) * coef_xmu + offset; dz may be grad_x itself.
void backward_apply(const float* dz, int64_t dz_stride_n, int64_t dz_stride_h, const float* x,
                    int64_t n, int64_t h, int64_t w, int64_t c, const float* mean,
                    const float* coef_dz, const float* coef_xmu, const float* offset,
                    float* grad_x) {
  const int64_t m = group_pixels(c);
  const std::vector<float> mu_rep = repeated(mean, c, m), a_rep = repeated(coef_dz, c, m),
                           b_rep = repeated(coef_xmu, c, m), o_rep = repeated(offset, c, m);
  at::parallel_for(0, n * h, 1, [&](int64_t l0, int64_t l1) {
    const float* __restrict mu = mu_rep.data();
    const float* __restrict a = a_rep.data();
    const float* __restrict b = b_rep.data();
    const float* __restrict o = o_rep.data();
    for (int64_t line = l0; line < l1; ++line) {
      const float* xs = x + line * w * c;
      float* out = grad_x + line * w * c;
      const float* ds = dz + (line / h) * dz_stride_n + (line % h) * dz_stride_h;
      for (int64_t i0 = 0; i0 < w; i0 += m) {
        const float* __restrict xp = xs + i0 * c;
        const int64_t len = (std::min(w, i0 + m) - i0) * c;
        if (ds == out) {
          // in place: one pointer, so the loop vectorizes without an alias check
          float* op = out + i0 * c;
          for (int64_t j = 0; j < len; ++j) op[j] = op[j] * a[j] + (xp[j] - mu[j]) * b[j] + o[j];
        } else {
          const float* __restrict dp = ds + i0 * c;
          float* __restrict op = out + i0 * c;
          for (int64_t j = 0; j < len; ++j) op[j] = dp[j] * a[j] + (xp[j] - mu[j]) * b[j] + o[j];
        }
      }
    }
  });
}

}  // namespace

extern "C" {

// act(batch_norm(x)) with batch statistics. x: (n, h, w, c) contiguous float32 (a channels-last
// map); out: the same shape, strided by out_stride_n / out_stride_h over n and h (the interior
// of a padded map). Writes save_mean and save_invstd (c floats each) and, when running_mean is
// not null, updates the running statistics as torch.batch_norm does (unbiased variance).
// Returns 0, or -1 when there is at most one value per channel.
int detector_bn_act_forward(const float* x, int64_t n, int64_t h, int64_t w, int64_t c,
                            const float* weight, const float* bias, float* running_mean,
                            float* running_var, double momentum, double eps, int act,
                            float* out, int64_t out_stride_n, int64_t out_stride_h,
                            float* save_mean, float* save_invstd) {
  const int64_t rows = n * h * w;
  if (rows <= 1) return -1;
  std::vector<double> mean(c), var(c);
  moments(x, rows, c, std::max<int64_t>(1, w), mean.data(), var.data());
  for (int64_t k = 0; k < c; ++k) {
    save_mean[k] = static_cast<float>(mean[k]);
    save_invstd[k] = static_cast<float>(1.0 / std::sqrt(var[k] + eps));
    if (running_mean != nullptr) {
      running_mean[k] = static_cast<float>(momentum * mean[k] + (1.0 - momentum) * running_mean[k]);
      const double unbiased = var[k] * static_cast<double>(rows) / static_cast<double>(rows - 1);
      running_var[k] = static_cast<float>(momentum * unbiased + (1.0 - momentum) * running_var[k]);
    }
  }
  std::vector<float> scale(c), shift(c);
  norm_affine(weight, bias, save_mean, save_invstd, c, scale.data(), shift.data());
  const float* sc = scale.data();
  const float* sh = shift.data();
  if (act == kSilu)
    apply_forward<kSilu>(x, n, h, w, c, sc, sh, out, out_stride_n, out_stride_h);
  else if (act == kRelu)
    apply_forward<kRelu>(x, n, h, w, c, sc, sh, out, out_stride_n, out_stride_h);
  else
    apply_forward<kIdentity>(x, n, h, w, c, sc, sh, out, out_stride_n, out_stride_h);
  return 0;
}

// Backward of detector_bn_act_forward. g: the output's gradient, (n, h, w, c) strided by
// g_stride_n / g_stride_h; x, weight, bias, save_mean, save_invstd: as in the forward. Writes
// grad_x ((n, h, w, c) contiguous, may be null), grad_weight and grad_bias (c floats each).
void detector_bn_act_backward(const float* g, int64_t g_stride_n, int64_t g_stride_h,
                              const float* x, int64_t n, int64_t h, int64_t w, int64_t c,
                              const float* weight, const float* bias, const float* save_mean,
                              const float* save_invstd, int act, float* grad_x,
                              float* grad_weight, float* grad_bias) {
  std::vector<float> scale(c), shift(c);
  norm_affine(weight, bias, save_mean, save_invstd, c, scale.data(), shift.data());
  std::vector<double> sum_dz(c), sum_dz_xmu(c);
  // without grad_x the activation's gradient has nowhere to go and is only summed
  std::vector<float> scratch;
  float* dz = grad_x;
  if (dz == nullptr && act != kIdentity) {
    scratch.resize(n * h * w * c);
    dz = scratch.data();
  }
  if (act == kSilu)
    backward_reduce<kSilu>(g, g_stride_n, g_stride_h, x, n, h, w, c, scale.data(), shift.data(),
                           save_mean, sum_dz.data(), sum_dz_xmu.data(), dz);
  else if (act == kRelu)
    backward_reduce<kRelu>(g, g_stride_n, g_stride_h, x, n, h, w, c, scale.data(), shift.data(),
                           save_mean, sum_dz.data(), sum_dz_xmu.data(), dz);
  else
    backward_reduce<kIdentity>(g, g_stride_n, g_stride_h, x, n, h, w, c, scale.data(),
                               shift.data(), save_mean, sum_dz.data(), sum_dz_xmu.data(), dz);
  for (int64_t k = 0; k < c; ++k) {
    grad_weight[k] = static_cast<float>(sum_dz_xmu[k] * save_invstd[k]);
    grad_bias[k] = static_cast<float>(sum_dz[k]);
  }
  if (grad_x == nullptr) return;
  // grad_x = (dz - mean(dz) - (x - mean) * k) * invstd * weight,
  // k = mean(dz * (x - mean)) * invstd^2
  const double rows = static_cast<double>(n * h * w);
  std::vector<float> coef_dz(c), coef_xmu(c), offset(c);
  for (int64_t k = 0; k < c; ++k) {
    const double invstd = save_invstd[k];
    const double a = invstd * weight[k];
    coef_dz[k] = static_cast<float>(a);
    coef_xmu[k] = static_cast<float>(-sum_dz_xmu[k] / rows * invstd * invstd * a);
    offset[k] = static_cast<float>(-sum_dz[k] / rows * a);
  }
  const bool dz_in_grad_x = act != kIdentity;
  backward_apply(dz_in_grad_x ? grad_x : g, dz_in_grad_x ? h * w * c : g_stride_n,
                 dz_in_grad_x ? w * c : g_stride_h, x, n, h, w, c, save_mean, coef_dz.data(),
                 coef_xmu.data(), offset.data(), grad_x);
}

}  // extern "C"
