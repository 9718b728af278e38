// Compiled CPU kernels of the masked-convolution engine (anytimeify/masking/engine.py).
//
// Only the memory-bound steps around the GEMM live here (the GEMM itself stays in oneDNN):
//   scatter_rows  builds the channels-last output from the conv rows of the kept positions in one
//                 pass (zero rows and copied rows), instead of a zero fill followed by a scatter;
//   halo_stencil  computes the RBF interpolation on the halo rows in one pass over the neighbours
//                 of each row, instead of one gather and one axpy per kernel tap.
// The pure-PyTorch code in engine.py is the reference; tests compare the two.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), name, " must be a contiguous (rows, channels) matrix");
}

void check_index(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kInt64 && t.is_contiguous(),
              name, " must be a contiguous int64 CPU tensor");
}

}  // namespace

// out: (rows, C) with C = y_kept's width; row kept_index[i] = y_kept[i], every other row 0.
// kept_index must be sorted ascending (torch.nonzero's order).
torch::Tensor scatter_rows(const torch::Tensor& y_kept, const torch::Tensor& kept_index, int64_t rows) {
  check_rows(y_kept, "y_kept");
  check_index(kept_index, "kept_index");
  const int64_t kept = kept_index.numel();
  TORCH_CHECK(y_kept.size(0) == kept, "y_kept has ", y_kept.size(0), " rows but kept_index ", kept);
  const int64_t channels = y_kept.size(1);
  auto out = torch::empty({rows, channels}, y_kept.options());
  const float* src = y_kept.data_ptr<float>();
  const int64_t* index = kept_index.data_ptr<int64_t>();
  float* dst = out.data_ptr<float>();
  const size_t row_bytes = sizeof(float) * channels;
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    int64_t k = std::lower_bound(index, index + kept, begin) - index;
    for (int64_t r = begin; r < end; ++r) {
      if (k < kept && index[k] == r) {
        std::memcpy(dst + r * channels, src + k * channels, row_bytes);
        ++k;
      } else {
        std::memset(dst + r * channels, 0, row_bytes);
      }
    }
  });
  return out;
}

// For every halo row h[m]: out[h[m]] = sum_t w[t] * out[nbr[m, t]], all reads before any write.
void halo_stencil(torch::Tensor out, const torch::Tensor& halo, const torch::Tensor& neighbours,
                  const torch::Tensor& weights) {
  check_rows(out, "out");
  check_index(halo, "halo");
  check_index(neighbours, "neighbours");
  TORCH_CHECK(weights.scalar_type() == torch::kFloat32 && weights.is_contiguous() && weights.dim() == 1,
              "weights must be a contiguous float32 vector");
  const int64_t count = halo.numel();
  const int64_t taps = weights.numel();
  TORCH_CHECK(neighbours.dim() == 2 && neighbours.size(0) == count && neighbours.size(1) == taps,
              "neighbours must be (", count, ", ", taps, "), got ", neighbours.sizes());
  if (count == 0) return;
  const int64_t channels = out.size(1);
  auto values = torch::empty({count, channels}, out.options());
  float* data = out.data_ptr<float>();
  float* vals = values.data_ptr<float>();
  const int64_t* nbr = neighbours.data_ptr<int64_t>();
  const int64_t* rows = halo.data_ptr<int64_t>();
  const float* w = weights.data_ptr<float>();
  at::parallel_for(0, count, 64, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      float* acc = vals + m * channels;
      std::fill(acc, acc + channels, 0.0f);
      const int64_t* row_nbr = nbr + m * taps;
      for (int64_t t = 0; t < taps; ++t) {
        const int64_t n = row_nbr[t];
        if (n == rows[m]) continue;  // outside the map: zero padding
        const float wt = w[t];
        const float* src = data + n * channels;
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) acc[c] += wt * src[c];
      }
    }
  });
  const size_t row_bytes = sizeof(float) * channels;
  at::parallel_for(0, count, 256, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) std::memcpy(data + rows[m] * channels, vals + m * channels, row_bytes);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scatter_rows", &scatter_rows, "Channels-last output rows from the kept rows (zeros elsewhere)");
  m.def("halo_stencil", &halo_stencil, "RBF interpolation on the halo rows, in place");
}
