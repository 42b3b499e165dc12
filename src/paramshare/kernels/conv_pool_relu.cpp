// relu(max_pool2d(conv2d(x, weight, bias, padding=1), 2)) for a one-channel input and a 3x3
// kernel, forward and weight/bias backward, in one pass each.
//
// Why: PyTorch runs this as a convolution that writes the full-size map (6.4 MB at batch 64,
// 32 channels, 28x28), a max-pool that reads it back and saves int64 indices, and a backward
// that scatters into a zero-filled full-size gradient before the convolution's weight gradient
// reads it all again: memory traffic for 29 MFLOP of work. Here each pooled output computes its
// four conv values in registers, keeps the max and which of the four won (one byte), and the
// backward recomputes the windows from the input instead of reading a full-size gradient.
//
// Maths: the same function. The max keeps the first of equal values in row-major order within
// the 2x2 window, and a NaN wins, as in max_pool2d; ReLU after the max equals max after ReLU. Sums run in
// another order than oneDNN's, so results match PyTorch's to float rounding. The weight
// gradient sums fixed chunks of images and then the chunks in order, so it does not depend on
// the number of threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;  // channels per vector
constexpr int64_t kChunk = 4;   // images per partial sum of the weight gradient

typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef uint8_t vb __attribute__((vector_size(kLanes)));

// n < kLanes only for the last block of a channel count that is not a multiple of kLanes.
template <typename V, typename T>
inline V load(const T* p, int64_t n) {
  V v = {};
  if (n == kLanes) std::memcpy(&v, p, sizeof(V));
  else std::memcpy(&v, p, n * sizeof(T));
  return v;
}

template <typename V, typename T>
inline void store(T* p, V v, int64_t n) {
  if (n == kLanes) std::memcpy(p, &v, sizeof(V));
  else std::memcpy(p, &v, n * sizeof(T));
}

// The image with a one-pixel zero border, so that every 4x4 input window is in bounds.
void pad_image(const float* img, int64_t H, int64_t W, float* padded) {
  std::fill(padded, padded + (H + 2) * (W + 2), 0.0f);
  for (int64_t y = 0; y < H; ++y) std::copy(img + y * W, img + (y + 1) * W, padded + (y + 1) * (W + 2) + 1);
}

void check(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4 && x.size(1) == 1,
              "x must be a float32 CPU tensor (N, 1, H, W)");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 4 && weight.size(1) == 1 &&
                  weight.size(2) == 3 && weight.size(3) == 3,
              "weight must be float32 (C, 1, 3, 3)");
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.dim() == 1 && bias.size(0) == weight.size(0),
              "bias must be float32 (C)");
  TORCH_CHECK(x.size(2) >= 2 && x.size(3) >= 2, "x must be at least 2x2");
}

}  // namespace

// Returns the pooled output (N, C, H/2, W/2), channels-last, and which of the window's four
// positions gave each max (uint8, 0-3 in row-major order), for the backward.
std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  check(x, weight, bias);
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3), C = weight.size(0);
  const int64_t Ho = H / 2, Wo = W / 2, Wp = W + 2;
  const auto xc = x.contiguous();
  const auto taps = weight.reshape({C, 9}).t().contiguous();
  const auto bc = bias.contiguous();
  auto out = at::empty({N, C, Ho, Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto phase = at::empty({N, Ho, Wo, C}, x.options().dtype(at::kByte));
  const float* xp = xc.data_ptr<float>();
  const float* tp = taps.data_ptr<float>();
  const float* bp = bc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  uint8_t* pp = phase.data_ptr<uint8_t>();
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<float> padded((H + 2) * Wp);
    for (int64_t n = n0; n < n1; ++n) {
      pad_image(xp + n * H * W, H, W, padded.data());
      for (int64_t c0 = 0; c0 < C; c0 += kLanes) {
        const int64_t nc = std::min(kLanes, C - c0);
        vf t[9];
        for (int k = 0; k < 9; ++k) t[k] = load<vf>(tp + k * C + c0, nc);
        const vf b = load<vf>(bp + c0, nc);
        for (int64_t i = 0; i < Ho; ++i) {
          for (int64_t j = 0; j < Wo; ++j) {
            const float* win = padded.data() + 2 * i * Wp + 2 * j;
            vf acc[4];
            for (int p = 0; p < 4; ++p) {
              const float* w0 = win + (p / 2) * Wp + p % 2;
              vf a = b;
              for (int k = 0; k < 9; ++k) a += w0[(k / 3) * Wp + k % 3] * t[k];
              acc[p] = a;
            }
            vf best = acc[0];
            vi arg = {};
            for (int p = 1; p < 4; ++p) {
              const vi more = (acc[p] > best) | (acc[p] != acc[p]);  // a NaN wins, as in max_pool2d
              best = more ? acc[p] : best;
              arg = more ? p : arg;
            }
            const int64_t at = ((n * Ho + i) * Wo + j) * C + c0;
            const vi keep = (best > 0.0f) | (best != best);  // relu(NaN) is NaN
            store(op + at, keep ? best : 0.0f, nc);
            store(pp + at, __builtin_convertvector(arg, vb), nc);
          }
        }
      }
    }
  });
  return {out, phase};
}

// The gradients of weight (C, 1, 3, 3) and bias (C) from the gradient of forward's output.
std::vector<at::Tensor> backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& out,
                                 const at::Tensor& phase) {
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3), C = out.size(1);
  const int64_t Ho = H / 2, Wo = W / 2, Hp = H + 2, Wp = W + 2;
  TORCH_CHECK(grad.sizes() == out.sizes() && out.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                  phase.is_contiguous() && phase.numel() == out.numel(),
              "grad, out and phase must be forward's shapes and layouts");
  const int64_t chunks = (N + kChunk - 1) / kChunk;
  const auto g = grad.contiguous(at::MemoryFormat::ChannelsLast);
  const auto xc = x.contiguous();
  auto partial = at::empty({chunks, 10, C}, x.options());  // rows 0-8: the taps, row 9: the bias
  const float* xp = xc.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  const float* op = out.data_ptr<float>();
  const uint8_t* pp = phase.data_ptr<uint8_t>();
  float* sp = partial.data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t q0, int64_t q1) {
    std::vector<float> padded(kChunk * Hp * Wp);
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t first = q * kChunk, last = std::min(N, first + kChunk);
      for (int64_t n = first; n < last; ++n) pad_image(xp + n * H * W, H, W, padded.data() + (n - first) * Hp * Wp);
      float* sum = sp + q * 10 * C;
      for (int64_t c0 = 0; c0 < C; c0 += kLanes) {
        const int64_t nc = std::min(kLanes, C - c0);
        vf w[9] = {}, b = {};
        for (int64_t n = first; n < last; ++n) {
          const float* img = padded.data() + (n - first) * Hp * Wp;
          for (int64_t i = 0; i < Ho; ++i) {
            for (int64_t j = 0; j < Wo; ++j) {
              const float* win = img + 2 * i * Wp + 2 * j;
              const int64_t at = ((n * Ho + i) * Wo + j) * C + c0;
              const vf v = load<vf>(op + at, nc) > 0.0f ? load<vf>(gp + at, nc) : 0.0f;
              const vi ph = __builtin_convertvector(load<vb>(pp + at, nc), vi);
              b += v;
              for (int p = 0; p < 4; ++p) {
                const vf gph = ph == p ? v : 0.0f;
                const float* w0 = win + (p / 2) * Wp + p % 2;
                for (int k = 0; k < 9; ++k) w[k] += w0[(k / 3) * Wp + k % 3] * gph;
              }
            }
          }
        }
        for (int k = 0; k < 9; ++k) store(sum + k * C + c0, w[k], nc);
        store(sum + 9 * C + c0, b, nc);
      }
    }
  });
  const auto total = partial.sum(0);
  return {total.narrow(0, 0, 9).t().reshape({C, 1, 3, 3}).contiguous(), total[9].contiguous()};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "relu(max_pool2d(conv3x3(x), 2)) and the winning position per output");
  m.def("backward", &backward, "weight and bias gradients");
}
