// Compiled CPU kernels of the masked-convolution engine (anytimeify/masking/engine.py).
//
// Only the memory-bound steps around the GEMM live here (the GEMM itself stays in oneDNN):
//   masked_output allocates the channels-last output (huge pages where the kernel allows) and zeroes
//                 only the rows that no kept conv output will overwrite;
//   halo_stencil  computes the RBF interpolation on the halo rows in one pass over the neighbours
//                 of each row, instead of one gather and one axpy per kernel tap.
// The pure-PyTorch code in engine.py is the reference; tests compare the two.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include <sys/mman.h>

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

// Advise the kernel to back a large buffer with transparent huge pages (where THP is in "madvise"
// mode): a fresh 100 MB output otherwise takes tens of thousands of page faults on first touch.
void advise_huge_pages(void* data, size_t bytes) {
#ifdef MADV_HUGEPAGE
  const uintptr_t huge = uintptr_t(1) << 21;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + huge - 1) & ~(huge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(huge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

// A (rows, channels) float32 matrix whose rows not listed in kept_index are 0; the kept rows are
// left uninitialised (the caller writes them). kept_index must be sorted ascending (nonzero order).
torch::Tensor masked_output(int64_t rows, int64_t channels, const torch::Tensor& kept_index) {
  check_index(kept_index, "kept_index");
  const int64_t kept = kept_index.numel();
  auto out = torch::empty({rows, channels}, torch::dtype(torch::kFloat32));
  float* dst = out.data_ptr<float>();
  const size_t row_bytes = sizeof(float) * channels;
  if (row_bytes * rows >= (size_t(1) << 22)) advise_huge_pages(dst, row_bytes * rows);
  const int64_t* index = kept_index.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1024, [&](int64_t begin, int64_t end) {
    int64_t k = std::lower_bound(index, index + kept, begin) - index;
    int64_t r = begin;
    while (r < end) {
      const int64_t stop = (k < kept && index[k] < end) ? index[k] : end;
      if (stop > r) std::memset(dst + r * channels, 0, row_bytes * (stop - r));
      r = stop;
      if (k < kept && index[k] == r) { ++r; ++k; }
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
  m.def("masked_output", &masked_output, "Output rows, zero except the kept ones (left uninitialised)");
  m.def("halo_stencil", &halo_stencil, "RBF interpolation on the halo rows, in place");
}
