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

// Pixels summed in float before they go into double totals: the sums stay as accurate as
// PyTorch's at any map size.
inline int64_t chunk_pixels(int64_t channels) { return std::max<int64_t>(8, 16384 / channels); }

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

// Chan et al.'s merge of per-channel (count, mean, M2) moments.
void merge_moments(double& count, double* mean, double* m2, double other_count,
                   const double* other_mean, const double* other_m2, int64_t channels) {
  if (other_count == 0) return;
  const double total = count + other_count;
  for (int64_t c = 0; c < channels; ++c) {
    const double delta = other_mean[c] - mean[c];
    mean[c] += delta * other_count / total;
    m2[c] += other_m2[c] + delta * delta * count * other_count / total;
  }
  count = total;
}

// Per-channel mean and biased variance of a (rows, c) row-major map. Each chunk of rows is
// summed twice while in cache (mean, then squared deviations), so there is one pass over memory
// and no E[x^2] - E[x]^2 cancellation.
void moments(const float* x, int64_t rows, int64_t c, double* mean, double* var) {
  const int64_t parts = num_parts(rows);
  std::vector<double> part_mean(parts * c, 0.0), part_m2(parts * c, 0.0), part_count(parts, 0.0);
  const int64_t chunk = chunk_pixels(c);
  for_parts(rows, parts, [&](int64_t p, int64_t begin, int64_t end) {
    std::vector<float> cmean(c), cm2(c);
    std::vector<double> cmean_d(c), cm2_d(c);
    double count = 0;
    for (int64_t r0 = begin; r0 < end; r0 += chunk) {
      const int64_t r1 = std::min(end, r0 + chunk);
      std::fill(cmean.begin(), cmean.end(), 0.0f);
      std::fill(cm2.begin(), cm2.end(), 0.0f);
      for (int64_t r = r0; r < r1; ++r) {
        const float* row = x + r * c;
        for (int64_t k = 0; k < c; ++k) cmean[k] += row[k];
      }
      const float inv = 1.0f / static_cast<float>(r1 - r0);
      for (int64_t k = 0; k < c; ++k) cmean[k] *= inv;
      for (int64_t r = r0; r < r1; ++r) {
        const float* row = x + r * c;
        for (int64_t k = 0; k < c; ++k) {
          const float d = row[k] - cmean[k];
          cm2[k] += d * d;
        }
      }
      for (int64_t k = 0; k < c; ++k) {
        cmean_d[k] = cmean[k];
        cm2_d[k] = cm2[k];
      }
      merge_moments(count, part_mean.data() + p * c, part_m2.data() + p * c,
                    static_cast<double>(r1 - r0), cmean_d.data(), cm2_d.data(), c);
    }
    part_count[p] = count;
  });
  std::vector<double> m2(c, 0.0);
  double count = 0;
  std::fill(mean, mean + c, 0.0);
  for (int64_t p = 0; p < parts; ++p)
    merge_moments(count, mean, m2.data(), part_count[p], part_mean.data() + p * c,
                  part_m2.data() + p * c, c);
  for (int64_t k = 0; k < c; ++k) var[k] = m2[k] / count;
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
                   const float* __restrict scale, const float* __restrict shift, float* out,
                   int64_t out_stride_n, int64_t out_stride_h) {
  at::parallel_for(0, n * h, 1, [&](int64_t l0, int64_t l1) {
    for (int64_t line = l0; line < l1; ++line) {
      const float* src = x + line * w * c;
      float* dst = out + (line / h) * out_stride_n + (line % h) * out_stride_h;
      for (int64_t i = 0; i < w * c; i += c) {
        const float* __restrict s = src + i;
        float* __restrict d = dst + i;
        for (int64_t k = 0; k < c; ++k) d[k] = activate<kAct>(s[k] * scale[k] + shift[k]);
      }
    }
  });
}

// Sums of dz and dz * (x - mean) per channel, dz = g * act'(x * scale + shift); dz is written
// to dz_out (contiguous) unless the activation is the identity.
template <int kAct>
void backward_reduce(const float* g, int64_t g_stride_n, int64_t g_stride_h, const float* x,
                     int64_t n, int64_t h, int64_t w, int64_t c, const float* __restrict scale,
                     const float* __restrict shift, const float* __restrict mean, double* sum_dz,
                     double* sum_dz_xmu, float* dz_out) {
  const int64_t lines = n * h;
  const int64_t parts = num_parts(lines);
  std::vector<double> partial(parts * 2 * c, 0.0);
  const int64_t flush = chunk_pixels(c);
  for_parts(lines, parts, [&](int64_t p, int64_t begin, int64_t end) {
    std::vector<float> acc(2 * c, 0.0f);
    float* __restrict acc_dz = acc.data();
    float* __restrict acc_dz_xmu = acc.data() + c;
    double* total = partial.data() + p * 2 * c;
    int64_t pending = 0;
    for (int64_t line = begin; line < end; ++line) {
      const float* xs = x + line * w * c;
      const float* gs = g + (line / h) * g_stride_n + (line % h) * g_stride_h;
      float* ds = kAct != kIdentity ? dz_out + line * w * c : nullptr;
      for (int64_t i = 0; i < w * c; i += c) {
        const float* __restrict xp = xs + i;
        const float* __restrict gp = gs + i;
        float* __restrict dp = kAct != kIdentity ? ds + i : nullptr;
        for (int64_t k = 0; k < c; ++k) {
          const float dz = activation_grad<kAct>(gp[k], xp[k] * scale[k] + shift[k]);
          if (kAct != kIdentity) dp[k] = dz;
          acc_dz[k] += dz;
          acc_dz_xmu[k] += dz * (xp[k] - mean[k]);
        }
        if (++pending == flush) {
          for (int64_t k = 0; k < 2 * c; ++k) {
            total[k] += acc[k];
            acc[k] = 0.0f;
          }
          pending = 0;
        }
      }
    }
    for (int64_t k = 0; k < 2 * c; ++k) total[k] += acc[k];
  });
  std::fill(sum_dz, sum_dz + c, 0.0);
  std::fill(sum_dz_xmu, sum_dz_xmu + c, 0.0);
  for (int64_t p = 0; p < parts; ++p) {
    for (int64_t k = 0; k < c; ++k) {
      sum_dz[k] += partial[p * 2 * c + k];
      sum_dz_xmu[k] += partial[p * 2 * c + c + k];
    }
  }
}

// grad_x = dz * coef_dz + (x - mean) * coef_xmu + offset; dz may be grad_x itself.
void backward_apply(const float* dz, int64_t dz_stride_n, int64_t dz_stride_h, const float* x,
                    int64_t n, int64_t h, int64_t w, int64_t c, const float* __restrict mean,
                    const float* __restrict coef_dz, const float* __restrict coef_xmu,
                    const float* __restrict offset, float* grad_x) {
  at::parallel_for(0, n * h, 1, [&](int64_t l0, int64_t l1) {
    for (int64_t line = l0; line < l1; ++line) {
      const float* xs = x + line * w * c;
      float* out = grad_x + line * w * c;
      const float* ds = dz + (line / h) * dz_stride_n + (line % h) * dz_stride_h;
      if (ds == out) {
        // in place: one pointer, so the loop vectorizes without an alias check
        for (int64_t i = 0; i < w * c; i += c) {
          float* op = out + i;
          const float* __restrict xp = xs + i;
          for (int64_t k = 0; k < c; ++k)
            op[k] = op[k] * coef_dz[k] + (xp[k] - mean[k]) * coef_xmu[k] + offset[k];
        }
      } else {
        for (int64_t i = 0; i < w * c; i += c) {
          float* __restrict op = out + i;
          const float* __restrict dp = ds + i;
          const float* __restrict xp = xs + i;
          for (int64_t k = 0; k < c; ++k)
            op[k] = dp[k] * coef_dz[k] + (xp[k] - mean[k]) * coef_xmu[k] + offset[k];
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
  moments(x, rows, c, mean.data(), var.data());
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
