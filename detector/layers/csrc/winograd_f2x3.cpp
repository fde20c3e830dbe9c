// The tile transforms of a Winograd F(2x2, 3x3) convolution (Lavin & Gray, 2016) for
// channels-last float32 maps on the CPU: 3x3 kernel, stride 1, zero padding 1.
//
// Each 2x2 output tile is computed from a 4x4 input tile as A^T [(G w G^T) . (B^T d B)] A, which
// turns the 36 multiply-adds per output pixel and channel pair of a direct 3x3 convolution into
// 16 per 2x2 tile (2.25x fewer). The products over channels are 16 matrix products that
// torch.bmm runs; the kernels here move the maps into and out of that "Winograd domain":
//   V[p][t][c]  input tiles,      p = 4x4 position, t = tile (image, tile row, tile column)
//   M[p][t][k]  products,         from which the output tiles follow
// and their adjoints for the backward pass. B^T, G and A^T have entries 0, +-1 (and 1/2 in G,
// applied to the weights in Python), so the transforms are additions, bound by memory. Loaded
// through ctypes by detector/layers/cpu_kernels.py; the threads are PyTorch's (at::parallel_for).
#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

namespace {

// Rows that out-of-image pixels point at, a zero row (reads) or a scratch row (writes), and a
// missing ReLU mask at, a row of ones, so that the channel loops run without a branch per pixel.
struct RowBuffers {
  std::vector<float> zeros, ones, scratch;
  explicit RowBuffers(int64_t channels)
      : zeros(channels, 0.0f), ones(channels, 1.0f), scratch(channels) {}
};

// The channels of pixel (r, s) of image img in an (n, h, w, c) map, or `outside` for a pixel
// off the image.
template <typename T, typename Outside>
inline T* pixel_or(T* map, int64_t img, int64_t r, int64_t s, int64_t h, int64_t w, int64_t c,
                   Outside* outside) {
  return r >= 0 && r < h && s >= 0 && s < w ? map + ((img * h + r) * w + s) * c : outside;
}

}  // namespace

extern "C" {

// x: (n, h, w, c) -> v: (16, tiles, c) = B^T d B for the tiles of tile rows [row_begin, row_end).
void detector_winograd_input_transform(const float* x, int64_t n, int64_t h, int64_t w,
                                       int64_t c, int64_t row_begin, int64_t row_end, float* v) {
  const int64_t th = (h + 1) / 2, tw = (w + 1) / 2, tiles = (row_end - row_begin) * tw;
  at::parallel_for(row_begin, row_end, 1, [&](int64_t begin, int64_t end) {
    RowBuffers buffers(c);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t img = row / th, i = row % th;
      for (int64_t j = 0; j < tw; ++j) {
        const int64_t t = (row - row_begin) * tw + j;
        const float* d[16];
        float* out[16];
        for (int a = 0; a < 4; ++a) {
          for (int b = 0; b < 4; ++b) {
            const int64_t r = 2 * i - 1 + a, s = 2 * j - 1 + b;
            d[4 * a + b] = pixel_or(x, img, r, s, h, w, c, buffers.zeros.data());
            out[4 * a + b] = v + ((4 * a + b) * tiles + t) * c;
          }
        }
#pragma omp simd
        for (int64_t k = 0; k < c; ++k) {
          float q[4][4];
          for (int b = 0; b < 4; ++b) {  // B^T on the rows
            q[0][b] = d[b][k] - d[8 + b][k];
            q[1][b] = d[4 + b][k] + d[8 + b][k];
            q[2][b] = d[8 + b][k] - d[4 + b][k];
            q[3][b] = d[4 + b][k] - d[12 + b][k];
          }
          for (int a = 0; a < 4; ++a) {  // B on the columns
            out[4 * a + 0][k] = q[a][0] - q[a][2];
            out[4 * a + 1][k] = q[a][1] + q[a][2];
            out[4 * a + 2][k] = q[a][2] - q[a][1];
            out[4 * a + 3][k] = q[a][1] - q[a][3];
          }
        }
      }
    }
  });
}

// m: (16, tiles, k) -> y: (n, h, w, k) = act(A^T m A + bias) on the tile rows
// [row_begin, row_end); bias may be null; relu: 0 none, 1 ReLU.
void detector_winograd_output_transform(const float* m, const float* bias, int relu, int64_t n,
                                        int64_t h, int64_t w, int64_t k, int64_t row_begin,
                                        int64_t row_end, float* y) {
  const int64_t th = (h + 1) / 2, tw = (w + 1) / 2, tiles = (row_end - row_begin) * tw;
  at::parallel_for(row_begin, row_end, 1, [&](int64_t begin, int64_t end) {
    RowBuffers buffers(k);
    const float* b0 = bias != nullptr ? bias : buffers.zeros.data();
    const float low = relu ? 0.0f : -__builtin_inff();
    for (int64_t row = begin; row < end; ++row) {
      const int64_t img = row / th, i = row % th;
      for (int64_t j = 0; j < tw; ++j) {
        const int64_t t = (row - row_begin) * tw + j;
        const float* p[16];
        float* out[4];
        for (int q = 0; q < 16; ++q) p[q] = m + (q * tiles + t) * k;
        for (int a = 0; a < 2; ++a) {
          for (int b = 0; b < 2; ++b) {
            const int64_t r = 2 * i + a, s = 2 * j + b;
            out[2 * a + b] = pixel_or(y, img, r, s, h, w, k, buffers.scratch.data());
          }
        }
#pragma omp simd
        for (int64_t o = 0; o < k; ++o) {
          float s[2][4];
          for (int b = 0; b < 4; ++b) {  // A^T on the rows
            s[0][b] = p[b][o] + p[4 + b][o] + p[8 + b][o];
            s[1][b] = p[4 + b][o] - p[8 + b][o] - p[12 + b][o];
          }
          for (int a = 0; a < 2; ++a) {  // A on the columns; NaN passes max as PyTorch's relu
            const float y0 = s[a][0] + s[a][1] + s[a][2] + b0[o];
            const float y1 = s[a][1] - s[a][2] - s[a][3] + b0[o];
            out[2 * a + 0][o] = y0 < low ? low : y0;
            out[2 * a + 1][o] = y1 < low ? low : y1;
          }
        }
      }
    }
  });
}

// The adjoint of the output transform on the tile rows [row_begin, row_end): dy: (n, h, w, k)
// -> dm: (16, tiles, k) = A g A^T, where g = dy, or dy where y > 0 when y (the ReLU's output) is
// given. bias_grad_rows: (n * ceil(h / 2), k), row r set to the sum of g over tile row r's pixels
// (their sum is the bias gradient).
void detector_winograd_grad_output_transform(const float* dy, const float* y, int64_t n,
                                             int64_t h, int64_t w, int64_t k, int64_t row_begin,
                                             int64_t row_end, float* dm, float* bias_grad_rows) {
  const int64_t th = (h + 1) / 2, tw = (w + 1) / 2, tiles = (row_end - row_begin) * tw;
  at::parallel_for(row_begin, row_end, 1, [&](int64_t begin, int64_t end) {
    RowBuffers buffers(k);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t img = row / th, i = row % th;
      float* bias_sum = bias_grad_rows + row * k;
      for (int64_t o = 0; o < k; ++o) bias_sum[o] = 0.0f;
      for (int64_t j = 0; j < tw; ++j) {
        const int64_t t = (row - row_begin) * tw + j;
        const float* g[4];
        const float* mask[4];
        float* out[16];
        for (int q = 0; q < 16; ++q) out[q] = dm + (q * tiles + t) * k;
        for (int a = 0; a < 2; ++a) {
          for (int b = 0; b < 2; ++b) {
            const int64_t r = 2 * i + a, s = 2 * j + b;
            g[2 * a + b] = pixel_or(dy, img, r, s, h, w, k, buffers.zeros.data());
            // an out-of-image pixel's g is zero whatever its mask
            mask[2 * a + b] = y == nullptr ? buffers.ones.data()
                                           : pixel_or(y, img, r, s, h, w, k, buffers.zeros.data());
          }
        }
#pragma omp simd
        for (int64_t o = 0; o < k; ++o) {
          // ReLU's backward as PyTorch's: the gradient passes unless y <= 0 (so also at NaN)
          float e[4];
          for (int q = 0; q < 4; ++q) e[q] = mask[q][o] <= 0.0f ? 0.0f : g[q][o];
          bias_sum[o] += (e[0] + e[1]) + (e[2] + e[3]);
          float u[4][2];
          for (int b = 0; b < 2; ++b) {  // A on the rows
            u[0][b] = e[b];
            u[1][b] = e[b] + e[2 + b];
            u[2][b] = e[b] - e[2 + b];
            u[3][b] = -e[2 + b];
          }
          for (int a = 0; a < 4; ++a) {  // A^T on the columns
            out[4 * a + 0][o] = u[a][0];
            out[4 * a + 1][o] = u[a][0] + u[a][1];
            out[4 * a + 2][o] = u[a][0] - u[a][1];
            out[4 * a + 3][o] = -u[a][1];
          }
        }
      }
    }
  });
}

// The adjoint of the input transform on the tile rows [row_begin, row_end): dv: (16, tiles, c)
// -> dx: (n, h, w, c) += B dv B^T summed over the overlapping tiles (dx is zeroed by the caller).
// Tile rows r and r + 2 share no pixel (in one image or two), so the even rows run in parallel,
// then the odd ones.
void detector_winograd_grad_input_transform(const float* dv, int64_t n, int64_t h, int64_t w,
                                            int64_t c, int64_t row_begin, int64_t row_end,
                                            float* dx) {
  const int64_t th = (h + 1) / 2, tw = (w + 1) / 2, tiles = (row_end - row_begin) * tw;
  for (int parity = 0; parity < 2; ++parity) {
    const int64_t first = row_begin + ((row_begin % 2) != parity);
    const int64_t count = first < row_end ? (row_end - first + 1) / 2 : 0;
    at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
      RowBuffers buffers(c);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t row = first + 2 * task;
        const int64_t img = row / th, i = row % th;
        for (int64_t j = 0; j < tw; ++j) {
          const int64_t t = (row - row_begin) * tw + j;
          const float* p[16];
          float* out[16];
          for (int q = 0; q < 16; ++q) p[q] = dv + (q * tiles + t) * c;
          for (int a = 0; a < 4; ++a) {
            for (int b = 0; b < 4; ++b) {
              const int64_t r = 2 * i - 1 + a, s = 2 * j - 1 + b;
              out[4 * a + b] = pixel_or(dx, img, r, s, h, w, c, buffers.scratch.data());
            }
          }
#pragma omp simd
          for (int64_t k = 0; k < c; ++k) {
            float q[4][4];
            for (int b = 0; b < 4; ++b) {  // B on the rows
              q[0][b] = p[b][k];
              q[1][b] = p[4 + b][k] - p[8 + b][k] + p[12 + b][k];
              q[2][b] = p[4 + b][k] + p[8 + b][k] - p[b][k];
              q[3][b] = -p[12 + b][k];
            }
            for (int a = 0; a < 4; ++a) {  // B^T on the columns
              out[4 * a + 0][k] += q[a][0];
              out[4 * a + 1][k] += q[a][1] - q[a][2] + q[a][3];
              out[4 * a + 2][k] += q[a][1] + q[a][2] - q[a][0];
              out[4 * a + 3][k] -= q[a][3];
            }
          }
        }
      }
    });
  }
}

}  // extern "C"
