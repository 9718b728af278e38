// Compiled CPU kernels of the masked-convolution engine (anytimeify/masking/engine.py).
//
//   implicit_conv  the convolution at the kept output positions only, an implicit GEMM (no im2col
//                  matrix) with register-blocked accumulators, writing straight into the output rows;
//                  (outputs of 32 MiB and more with streaming stores: see stream_vec);
//   implicit_rows  the same for thin outputs (few channels), vectorised over output positions;
//   masked_output  allocates the channels-last output (huge pages where the kernel allows) and fills
//                  only the rows that no kept conv output will overwrite (0, or the layer's shift,
//                  plus a folded residual), or none where the conv's only reader never reads them;
//   fill_skipped   the same fill, in place, after a dense conv;
//   halo_stencil   the RBF interpolation on the halo rows, in one pass over the neighbours of each
//                  row, with the layer's per-channel shift and ReLU fused in;
//   fuse_branches  HRNet's branch fusion (bilinear resize + concatenation) in one channels-last pass;
//   resize_bilinear, avg_pool2x2  the exits' up and down steps, channels-last, into pooled outputs;
//   halo_lists, boundary_slots  the index lists of a mask plan (the interpolation halo and its taps,
//                  the kept rows the stencil reads) in one pass over the keep map;
//   fuse_sum       HRNet's fuse layers (nearest or bilinear upsampling, the sum of the branches, ReLU) in one pass;
//   (outputs of 4 MiB and more come from a pool of reused buffers: see "buffer pool" below)
//   add_residual   a residual connection (and the ReLU after it) folded into the masked conv's output
//                  where no other pass can take it (implicit_conv, masked_output and halo_stencil add
//                  it as they write their rows);
//   (with a ReLU, the implicit GEMM writes the activated rows and keeps the values before the
//   activation of the kept rows next to the halo in a side buffer, which the stencil reads)
// The pure-PyTorch code in engine.py is the reference; tests compare the two.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <new>
#include <tuple>
#include <type_traits>
#include <vector>

#include <sys/mman.h>

#if defined(__SSE__)
#include <immintrin.h>
#endif

// ------------------------------------------------------------------------------- vector ISA
// The register blocking of the implicit GEMMs is sized by the target's vector width (AT_LANES
// floats) and vector register count (AT_REGS), read from the compiler's predefined macros at build
// time: a block's accumulators must stay in registers, or the kernel spills on every multiply-add
// (a blocking sized for AVX-512's 32 registers of 16 floats ran at 1.8 GMAC/s on an AVX2 Zen 3,
// where oneDNN ran at 38-56). ANYTIMEIFY_LANES / ANYTIMEIFY_REGS override both (the tests build the
// 4-lane, 32-register tables of ARM NEON on x86 that way).
#if defined(ANYTIMEIFY_LANES)
#define AT_LANES ANYTIMEIFY_LANES
#elif defined(__AVX512F__)
#define AT_LANES 16
#elif defined(__AVX__)
#define AT_LANES 8
#else
#define AT_LANES 4  // SSE, NEON, or whatever GCC's generic vectors become
#endif
#if defined(ANYTIMEIFY_REGS)
#define AT_REGS ANYTIMEIFY_REGS
#elif defined(__AVX512F__) || defined(__aarch64__) || defined(__ARM_NEON)
#define AT_REGS 32
#else
#define AT_REGS 16
#endif
#if AT_LANES != 4 && AT_LANES != 8 && AT_LANES != 16
#error "ANYTIMEIFY_LANES must be 4, 8 or 16"
#endif

#if defined(__AVX512F__)
#define ANYTIMEIFY_ISA "avx512"
#elif defined(__AVX2__) && defined(__FMA__)
#define ANYTIMEIFY_ISA "avx2"
#elif defined(__AVX__)
#define ANYTIMEIFY_ISA "avx"
#elif defined(__aarch64__) || defined(__ARM_NEON)
#define ANYTIMEIFY_ISA "neon"
#elif defined(__SSE2__)
#define ANYTIMEIFY_ISA "sse2"
#else
#define ANYTIMEIFY_ISA "generic"
#endif

// The implicit GEMM's register blocks as X(VB, P): VB output channels (a multiple of AT_LANES) times
// P positions, so that P x VB/AT_LANES accumulators, VB/AT_LANES weight vectors and a broadcast fit
// in the registers (at most 24 of 32 or 12 of 16 accumulators).
#if AT_REGS >= 32 && AT_LANES == 16
#define ANYTIMEIFY_BLOCKINGS(X) X(16, 14) X(32, 12) X(48, 8) X(64, 6)
#elif AT_REGS >= 32 && AT_LANES == 8
#define ANYTIMEIFY_BLOCKINGS(X) X(8, 24) X(16, 12) X(24, 8) X(32, 6)
#elif AT_REGS >= 32
#define ANYTIMEIFY_BLOCKINGS(X) X(8, 12) X(12, 8) X(16, 6)
#elif AT_LANES == 16
#define ANYTIMEIFY_BLOCKINGS(X) X(16, 6) X(32, 3)
#elif AT_LANES == 8
#define ANYTIMEIFY_BLOCKINGS(X) X(8, 12) X(16, 6) X(24, 4)
#else
#define ANYTIMEIFY_BLOCKINGS(X) X(4, 12) X(8, 6) X(12, 4)
#endif
// The row-vectorised kernel's blocks: 2 vectors of positions times up to NC output channels
// (2 x NC accumulators).
#if AT_REGS >= 32
#define ANYTIMEIFY_ROW_CHUNKS(X) X(4) X(6) X(8) X(10) X(12)
#define AT_ROWS_MAX_CHUNK 12
#else
#define ANYTIMEIFY_ROW_CHUNKS(X) X(4) X(6)
#define AT_ROWS_MAX_CHUNK 6
#endif

// A vector loaded once and used by several multiply-adds must stay in a register: with 16 vector
// registers GCC otherwise folds the load into every FMA that reads it (the implicit GEMM's 24x4
// AVX2 block then issued 16 loads per 12 FMAs and was load-bound). The empty asm statement makes
// the value live in a vector register. AVX-512 builds keep the code generation they were measured
// with.
#if defined(__AVX512F__) || defined(ANYTIMEIFY_NO_PIN)
#define ANYTIMEIFY_PIN(v) ((void)0)
#elif defined(__x86_64__) || defined(__i386__)
#define ANYTIMEIFY_PIN(v) asm("" : "+x"(v))
#elif defined(__aarch64__)
#define ANYTIMEIFY_PIN(v) asm("" : "+w"(v))
#else
#define ANYTIMEIFY_PIN(v) ((void)0)
#endif

namespace {

constexpr int kLanes = AT_LANES;

// AT_LANES floats in one register, aligned and unaligned, and lane indices
typedef float vec __attribute__((vector_size(4 * AT_LANES)));
typedef float vecu __attribute__((vector_size(4 * AT_LANES), aligned(4)));
typedef int32_t veci __attribute__((vector_size(4 * AT_LANES)));

// Non-temporal ("streaming") stores write a full cache line to memory without reading it first:
// for outputs far larger than the caches, which the next layer reads from memory anyway, they
// save the read of every written line. dst must be aligned to the vector's size. Where the
// target has no such store (or lanes are overridden), a plain store.
inline void stream_vec(float* dst, vec v) {
#if defined(__AVX512F__) && AT_LANES == 16
  _mm512_stream_ps(dst, (__m512)v);
#elif defined(__AVX__) && AT_LANES == 8
  _mm256_stream_ps(dst, (__m256)v);
#elif defined(__SSE__) && AT_LANES == 4
  _mm_stream_ps(dst, (__m128)v);
#else
  *(vec*)dst = v;
#endif
}

// The first n (0 < n < AT_LANES) floats at p as a vector (the other lanes 0), and the first n
// lanes of v stored at p: masked loads and stores where the target has them, else one lane at a
// time. Neither touches memory past p + n (a tensor's last row has nothing after it).
inline vec load_first(const float* p, int64_t n) {
#if defined(__AVX512F__) && AT_LANES == 16
  return (vec)_mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1u), p);
#elif defined(__AVX2__) && AT_LANES == 8
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return (vec)_mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), lanes));
#else
  vec v = {};
  for (int64_t i = 0; i < n; ++i) v[i] = p[i];
  return v;
#endif
}

inline void store_first(float* p, vec v, int64_t n) {
#if defined(__AVX512F__) && AT_LANES == 16
  _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1u), (__m512)v);
#elif defined(__AVX2__) && AT_LANES == 8
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), lanes), (__m256)v);
#else
  for (int64_t i = 0; i < n; ++i) p[i] = v[i];
#endif
}

// Orders the streaming stores of this thread before what follows (the end of a parallel task).
inline void stream_fence() {
#if defined(__SSE__)
  _mm_sfence();
#endif
}

// Outputs of at least this many bytes are written with streaming stores by the implicit GEMMs
// (default 32 MiB: far beyond what a core's L2 and its share of L3 keep; benchmarks/dense_epilogues.py
// measures the whole models with and without); set_stream_min_bytes changes it.
std::atomic<int64_t> g_stream_min_bytes{int64_t(32) << 20};

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

// ---------------------------------------------------------------------------- buffer pool
// Large outputs (a 720-channel map at 256x512 is 377 MB) are allocated and freed once per image. glibc
// serves allocations above 32 MB with fresh mmaps, so every such output costs the kernel's page
// faults and page zeroing again: measured on HRNet-W48 at 1024x2048, the branch fusion of the head
// took 0.32 s inside the model against 0.04 s with its memory reused. The kernels here therefore
// allocate their outputs of kMinPooled (4 MiB) and more from a pool: a tensor's memory goes back to
// the pool when the tensor dies and serves the next output of about its size, with its pages
// still mapped. The pool keeps at most `limit` bytes of unused buffers (set_pool_limit; 0 turns it
// off) and release_pool() returns them all to the system.
namespace {

constexpr size_t kMinPooled = size_t(1) << 22;
constexpr size_t kPoolAlign = size_t(1) << 21;  // huge-page granularity

struct BufferPool {
  std::mutex mutex;
  std::multimap<size_t, void*> unused;  // capacity -> buffer
  size_t unused_bytes = 0;
  size_t limit = size_t(2) << 30;
  size_t min_bytes = kMinPooled;  // smaller outputs come from torch::empty
  int64_t hits = 0, misses = 0;
};

// Never destroyed: tensors that outlive static destruction still return their memory here.
BufferPool& pool() {
  static BufferPool* instance = new BufferPool();
  return *instance;
}

void give_back(void* data, size_t capacity) {
  BufferPool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    if (p.unused_bytes + capacity <= p.limit) {
      p.unused.emplace(capacity, data);
      p.unused_bytes += capacity;
      return;
    }
  }
  std::free(data);
}

}  // namespace

// A contiguous float32 CPU tensor of `sizes`, uninitialised; from the pool when large enough.
torch::Tensor pooled_empty(const std::vector<int64_t>& sizes) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = sizeof(float) * size_t(std::max<int64_t>(numel, 0));
  BufferPool& p = pool();
  const size_t capacity = (bytes + kPoolAlign - 1) / kPoolAlign * kPoolAlign;
  void* data = nullptr;
  size_t taken = capacity;
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    if (p.limit == 0 || bytes == 0 || bytes < p.min_bytes) return torch::empty(sizes, torch::dtype(torch::kFloat32));
    // the smallest unused buffer that fits, unless it wastes more than an eighth of itself
    auto it = p.unused.lower_bound(capacity);
    if (it != p.unused.end() && it->first - capacity <= it->first / 8) {
      data = it->second;
      taken = it->first;
      p.unused_bytes -= taken;
      p.unused.erase(it);
      ++p.hits;
    } else {
      ++p.misses;
    }
  }
  if (data == nullptr) {
    data = std::aligned_alloc(kPoolAlign, capacity);
    if (data == nullptr) throw std::bad_alloc();
    advise_huge_pages(data, capacity);
  }
  return torch::from_blob(data, sizes, [taken](void* d) { give_back(d, taken); }, torch::dtype(torch::kFloat32));
}

// Maximum bytes of unused buffers the pool keeps (0: no pooling); returns the previous limit.
int64_t set_pool_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "the buffer pool limit must be >= 0 bytes, got ", bytes);
  std::vector<void*> dropped;
  int64_t previous;
  {
    BufferPool& p = pool();
    std::lock_guard<std::mutex> lock(p.mutex);
    previous = int64_t(p.limit);
    p.limit = size_t(bytes);
    while (p.unused_bytes > p.limit) {  // drop the largest buffers first
      auto it = std::prev(p.unused.end());
      p.unused_bytes -= it->first;
      dropped.push_back(it->second);
      p.unused.erase(it);
    }
  }
  for (void* d : dropped) std::free(d);
  return previous;
}

// Smallest output taken from the pool (tests pool everything to check that no kernel reads memory
// it did not write); returns the previous value.
int64_t set_pool_min_bytes(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "the smallest pooled size must be >= 0 bytes, got ", bytes);
  BufferPool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  const int64_t previous = int64_t(p.min_bytes);
  p.min_bytes = size_t(bytes);
  return previous;
}

// Return every unused buffer to the system.
void release_pool() {
  std::vector<void*> dropped;
  {
    BufferPool& p = pool();
    std::lock_guard<std::mutex> lock(p.mutex);
    for (auto& entry : p.unused) dropped.push_back(entry.second);
    p.unused.clear();
    p.unused_bytes = 0;
  }
  for (void* d : dropped) std::free(d);
}

// (unused bytes, unused buffers, hits, misses, limit)
std::vector<int64_t> pool_stats() {
  BufferPool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  return {int64_t(p.unused_bytes), int64_t(p.unused.size()), p.hits, p.misses, int64_t(p.limit)};
}

namespace {

// Write fill (or 0 when fill is null) into every row of dst not listed in the sorted kept index;
// with a residual (rows x channels), act(fill + residual row) instead.
void fill_unlisted(float* dst, int64_t rows, int64_t channels, const int64_t* index, int64_t kept,
                   const float* fill, const float* res, bool relu) {
  const size_t row_bytes = sizeof(float) * channels;
  // a parallel region costs more than a small fill (waking the other threads): 4 MiB per task at least
  const int64_t grain = std::max<int64_t>(1024, (int64_t(1) << 20) / std::max<int64_t>(channels, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    int64_t k = std::lower_bound(index, index + kept, begin) - index;
    int64_t r = begin;
    while (r < end) {
      const int64_t stop = (k < kept && index[k] < end) ? index[k] : end;
      if (stop > r && res != nullptr) {
        for (int64_t q = r; q < stop; ++q) {
          float* d = dst + q * channels;
          const float* a = res + q * channels;
          if (relu) {
#pragma omp simd
            for (int64_t c = 0; c < channels; ++c) d[c] = std::max((fill ? fill[c] : 0.0f) + a[c], 0.0f);
          } else {
#pragma omp simd
            for (int64_t c = 0; c < channels; ++c) d[c] = (fill ? fill[c] : 0.0f) + a[c];
          }
        }
      } else if (stop > r) {
        if (fill == nullptr) {
          std::memset(dst + r * channels, 0, row_bytes * (stop - r));
        } else {
          // a run of rows: the first one from fill, then the rows written so far copied onward,
          // doubling (a few large copies instead of one small copy per row)
          float* first = dst + r * channels;
          std::memcpy(first, fill, row_bytes);
          for (int64_t done = 1, total = stop - r; done < total;) {
            const int64_t n = std::min(done, total - done);
            std::memcpy(first + done * channels, first, row_bytes * n);
            done += n;
          }
        }
      }
      r = stop;
      if (k < kept && index[k] == r) { ++r; ++k; }
    }
  });
}

const float* optional_vector(const torch::Tensor& t, int64_t channels, const char* name) {
  if (!t.defined() || t.numel() == 0) return nullptr;
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.numel() == channels,
              name, " must be a contiguous float32 CPU vector of ", channels, " values, got ", t.sizes());
  return t.data_ptr<float>();
}

// An optional (rows, channels) residual matrix (empty: none).
const float* optional_rows(const torch::Tensor& t, int64_t rows, int64_t channels, const char* name) {
  if (!t.defined() || t.numel() == 0) return nullptr;
  check_rows(t, name);
  TORCH_CHECK(t.size(0) == rows && t.size(1) == channels, name, " must be (", rows, ", ", channels, "), got ", t.sizes());
  return t.data_ptr<float>();
}

// The optional side rows of an implicit GEMM (slots empty: none): the slot of every output row
// (-1: none) and the (slots, C_out) matrix of conv + bias values kept for the halo stencil.
void side_rows_of(const torch::Tensor& slots, torch::Tensor& side, int64_t rows, int64_t cout, const int32_t** slot,
                  float** side_rows) {
  if (!slots.defined() || slots.numel() == 0) return;
  TORCH_CHECK(slots.scalar_type() == torch::kInt32 && slots.is_contiguous() && slots.numel() == rows,
              "slots must be a contiguous int32 tensor with one entry per row of out");
  TORCH_CHECK(side.scalar_type() == torch::kFloat32 && side.is_contiguous() && side.dim() == 2 && side.size(1) == cout,
              "side must be a contiguous float32 (slots, ", cout, ") matrix");
  *slot = slots.data_ptr<int32_t>();
  *side_rows = side.data_ptr<float>();
}

}  // namespace

// A (rows, channels) float32 matrix whose rows not listed in kept_index hold fill (a vector of
// channels values; 0 where fill is empty), or act(fill + residual row) with a residual; the kept
// rows are left uninitialised (the caller writes them). kept_index must be sorted ascending
// (nonzero order). With write_skipped false no row is written: the caller writes every row that
// is ever read (the rows a masked conv's only reader never reads stay uninitialised).
torch::Tensor masked_output(int64_t rows, int64_t channels, const torch::Tensor& kept_index, const torch::Tensor& fill,
                            const torch::Tensor& residual, bool relu, bool write_skipped) {
  check_index(kept_index, "kept_index");
  auto out = pooled_empty({rows, channels});
  float* dst = out.data_ptr<float>();
  if (write_skipped)
    fill_unlisted(dst, rows, channels, kept_index.data_ptr<int64_t>(), kept_index.numel(),
                  optional_vector(fill, channels, "fill"), optional_rows(residual, rows, channels, "residual"), relu);
  return out;
}

// In place: every row of out not listed in kept_index becomes fill (0 where fill is empty).
void fill_skipped(torch::Tensor out, const torch::Tensor& kept_index, const torch::Tensor& fill) {
  check_rows(out, "out");
  check_index(kept_index, "kept_index");
  fill_unlisted(out.data_ptr<float>(), out.size(0), out.size(1), kept_index.data_ptr<int64_t>(), kept_index.numel(),
                optional_vector(fill, out.size(1), "fill"), nullptr, false);
}

// The RBF interpolation on the halo rows, in place, with the layer's per-channel shift (kept rows
// with a slot are read from side[slot], their values before the activation):
//   out[h[m]] = act( sum_{t: keep[nbr[m,t]]} w[t] * out[nbr[m,t]] + shift * (1 - sum_{t: keep[nbr[m,t]]} w[t])
//                    [+ residual[h[m]]] )
// The kept rows hold y + shift (the shift folded into the conv bias), so this is I(y*m) + shift.
// Only kept rows are read and only halo (skipped) rows written, so rows are written directly.
void halo_stencil(torch::Tensor out, const torch::Tensor& halo, const torch::Tensor& neighbours,
                  const torch::Tensor& weights, const torch::Tensor& keep, const torch::Tensor& shift, bool relu,
                  const torch::Tensor& slots, const torch::Tensor& side, const torch::Tensor& residual) {
  check_rows(out, "out");
  check_index(halo, "halo");
  check_index(neighbours, "neighbours");
  TORCH_CHECK(weights.scalar_type() == torch::kFloat32 && weights.is_contiguous() && weights.dim() == 1,
              "weights must be a contiguous float32 vector");
  TORCH_CHECK(keep.scalar_type() == torch::kBool && keep.is_contiguous() && keep.numel() == out.size(0),
              "keep must be a contiguous bool tensor with one entry per row of out");
  const int64_t count = halo.numel();
  const int64_t taps = weights.numel();
  TORCH_CHECK(neighbours.dim() == 2 && neighbours.size(0) == count && neighbours.size(1) == taps,
              "neighbours must be (", count, ", ", taps, "), got ", neighbours.sizes());
  if (count == 0) return;
  const int64_t channels = out.size(1);
  const float* sh = optional_vector(shift, channels, "shift");
  const float* res = optional_rows(residual, out.size(0), channels, "residual");
  const int32_t* slot = nullptr;
  const float* side_rows = nullptr;
  if (slots.defined() && slots.numel()) {
    TORCH_CHECK(slots.scalar_type() == torch::kInt32 && slots.is_contiguous() && slots.numel() == out.size(0),
                "slots must be a contiguous int32 tensor with one entry per row of out");
    TORCH_CHECK(side.scalar_type() == torch::kFloat32 && side.is_contiguous() && side.dim() == 2 &&
                side.size(1) == channels, "side must be a contiguous float32 (slots, ", channels, ") matrix");
    slot = slots.data_ptr<int32_t>();
    side_rows = side.data_ptr<float>();
  }
  float* data = out.data_ptr<float>();
  const bool* kp = keep.data_ptr<bool>();
  const int64_t* nbr = neighbours.data_ptr<int64_t>();
  const int64_t* rows = halo.data_ptr<int64_t>();
  const float* w = weights.data_ptr<float>();
  // at least about 2^17 multiply-adds per task: a parallel region costs more than a small halo
  const int64_t grain = std::max<int64_t>(64, (int64_t(1) << 17) / std::max<int64_t>(taps * channels, 1));
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    std::vector<const float*> srcs(taps);
    std::vector<float> wts(taps);
    for (int64_t m = begin; m < end; ++m) {
      // the kept neighbours of this row (skipped ones hold y*m = 0, outside the map is zero padding)
      const int64_t* row_nbr = nbr + m * taps;
      int64_t used = 0;
      float wsum = 0.0f;
      for (int64_t t = 0; t < taps; ++t) {
        const int64_t n = row_nbr[t];
        if (!kp[n]) continue;
        wsum += w[t];
        wts[used] = w[t];
        srcs[used++] = (slot != nullptr && slot[n] >= 0) ? side_rows + int64_t(slot[n]) * channels : data + n * channels;
      }
      float* dst = data + rows[m] * channels;
      const float* r = res ? res + rows[m] * channels : nullptr;
      const float rest = 1.0f - wsum;
      // one vector of channels at a time, the sum over the kept neighbours in one register
      for (int64_t c0 = 0; c0 < channels; c0 += kLanes) {
        const int64_t cn = std::min<int64_t>(kLanes, channels - c0);
        vec acc = {};
        if (cn == kLanes) {
          for (int64_t k = 0; k < used; ++k) acc += wts[k] * *(const vecu*)(srcs[k] + c0);
          if (sh) acc += rest * *(const vecu*)(sh + c0);
          if (r) acc += *(const vecu*)(r + c0);
          if (relu) { const vec zero = {}; acc = acc > zero ? acc : zero; }
          *(vecu*)(dst + c0) = acc;
          continue;
        }
        // the last channels (fewer than a vector: W18's 18, 36 and 72 leave 2, 4 and 8 of 16):
        // the same sum in masked vectors (ANYTIMEIFY_SCALAR_TAIL: one scalar sum per channel, as
        // before; benchmarks/halo_stencil.py compares the two builds)
#if defined(ANYTIMEIFY_SCALAR_TAIL)
        for (int64_t c = 0; c < cn; ++c) {
          float v = 0.0f;
          for (int64_t k = 0; k < used; ++k) v += wts[k] * srcs[k][c0 + c];
          if (sh) v += sh[c0 + c] * rest;
          if (r) v += r[c0 + c];
          dst[c0 + c] = relu ? std::max(v, 0.0f) : v;
        }
#else
        for (int64_t k = 0; k < used; ++k) acc += wts[k] * load_first(srcs[k] + c0, cn);
        if (sh) acc += rest * load_first(sh + c0, cn);
        if (r) acc += load_first(r + c0, cn);
        if (relu) { const vec zero = {}; acc = acc > zero ? acc : zero; }
        store_first(dst + c0, acc, cn);
#endif
      }
    }
  });
}

// ---------------------------------------------------------------------------- implicit GEMM
// The convolution at the kept output positions only, written straight into their output rows:
// no im2col matrix. The reduction runs over "runs": with dilation 1 along x, the kw taps of one
// kernel row read kw*C_in consecutive floats of the NHWC input (the packed weights of those taps
// are consecutive too), so one run is one kernel row; otherwise one tap. A group of P positions and
// one block of VB = NV*AT_LANES output channels keeps its accumulators (P x NV vectors) in
// registers over a run, broadcasting one input value per position and loading one block of weights
// per input element. Up to kMaxGroups groups share a run's weights while they are in L1; partial
// sums between runs go to a small per-thread buffer. Runs that cross the map border are copied to
// a scratch row with zeros outside. Weights are packed (blocks, taps, C_in, VB), zero padded.

constexpr int kMaxGroups = 8;

// Write one kept position's accumulators (one block of VB output channels starting at channel c0)
// into its output row: conv + bias into its side row when it has a slot (the stencil still reads
// it), then the residual and the ReLU; count: the block's real channels (the rest is padding).
template <int NV>
inline void store_block(vec* acc, int64_t row, int64_t c0, int64_t count, int64_t cout, float* out,
                        const int32_t* slots, float* side, const float* res, bool relu, float* tail,
                        bool stream) {
  constexpr int VB = NV * kLanes;
  if (slots != nullptr && slots[row] >= 0) {
    float* keep = side + int64_t(slots[row]) * cout + c0;
    for (int v = 0; v < NV; ++v) *(vec*)(tail + v * kLanes) = acc[v];
    std::memcpy(keep, tail, sizeof(float) * count);
  }
  if (res != nullptr) {
    const float* rr = res + row * cout + c0;
    if (count == VB) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[v] += *(const vecu*)(rr + v * kLanes);
    } else {
      std::memcpy(tail, rr, sizeof(float) * count);
      for (int v = 0; v < NV; ++v) acc[v] += *(vec*)(tail + v * kLanes);
    }
  }
  if (relu) {
    const vec zero = {};
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[v] = acc[v] > zero ? acc[v] : zero;
  }
  float* dst = out + row * cout + c0;
  if (count == VB && stream) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) stream_vec(dst + v * kLanes, acc[v]);
  } else if (count == VB) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) *(vecu*)(dst + v * kLanes) = acc[v];
  } else {
    for (int v = 0; v < NV; ++v) *(vec*)(tail + v * kLanes) = acc[v];
    std::memcpy(dst, tail, sizeof(float) * count);
  }
}


template <int NV, int P>
void implicit_kernel(const float* x, int64_t H, int64_t W, int64_t C, const float* packed, int64_t blocks,
                     int64_t taps, const float* bias, int64_t cout, const int64_t* kept, int64_t n, float* out,
                     int64_t oh, int64_t ow, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                     int64_t dh, int64_t dw, const float* zeros, bool relu, const int32_t* slots,
                     float* side, const float* res, bool stream) {
  constexpr int VB = NV * kLanes;
  constexpr int QMAX = P * kMaxGroups;
  // groups of P positions per task: several share each run's weights while they are in L1, but
  // small layers keep one group per task unless every thread still gets two tasks
  const int G = n >= int64_t(QMAX) * 2 * at::get_num_threads() ? kMaxGroups : 1;
  const int Q = P * G;
  const bool rows_contiguous = dw == 1;
  const int64_t runs = rows_contiguous ? kh : kh * kw;       // contiguous input runs per position
  const int64_t taps_per_run = rows_contiguous ? kw : 1;
  const int64_t L = taps_per_run * C;                         // floats per run
  const int64_t tasks = (n + Q - 1) / Q;
  const int64_t oplane = oh * ow;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> accbuf(size_t(Q) * VB);
    std::vector<float> scratch(size_t(Q) * L);
    int64_t by[QMAX], bx[QMAX], plane[QMAX];
    bool valid[QMAX];
    const float* rows[P];
    alignas(64) float tail[VB];
    for (int64_t task = t0; task < t1; ++task) {
      for (int q = 0; q < Q; ++q) {
        const int64_t i = task * Q + q;
        valid[q] = i < n;
        const int64_t idx = valid[q] ? kept[i] : 0;
        const int64_t r = idx % oplane;
        by[q] = (r / ow) * sh - ph;
        bx[q] = (r % ow) * sw - pw;
        plane[q] = (idx / oplane) * H * W;
      }
      int live_groups = 0;
      for (int g = 0; g < G; ++g) if (valid[g * P]) live_groups = g + 1;
      for (int64_t cb = 0; cb < blocks; ++cb) {
        for (int64_t run = 0; run < runs; ++run) {
          const int64_t ky = rows_contiguous ? run : run / kw;
          const int64_t kx0 = rows_contiguous ? 0 : run % kw;
          const float* wp = packed + (cb * taps + run * taps_per_run) * C * VB;
          for (int g = 0; g < live_groups; ++g) {
            for (int p = 0; p < P; ++p) {
              const int q = g * P + p;
              const int64_t iy = by[q] + ky * dh;
              if (!valid[q] || iy < 0 || iy >= H) { rows[p] = zeros; continue; }
              const int64_t ix0 = bx[q] + kx0 * dw;
              const int64_t ix1 = ix0 + (taps_per_run - 1) * dw;
              const float* base = x + (plane[q] + iy * W) * C;
              if (ix0 >= 0 && ix1 < W) { rows[p] = base + ix0 * C; continue; }
              float* s = scratch.data() + size_t(q) * L;  // border: copy the run, zeros outside the map
              for (int64_t k = 0; k < taps_per_run; ++k) {
                const int64_t ix = ix0 + k * dw;
                if (ix >= 0 && ix < W) std::memcpy(s + k * C, base + ix * C, sizeof(float) * C);
                else std::memset(s + k * C, 0, sizeof(float) * C);
              }
              rows[p] = s;
            }
            vec acc[P][NV];
            float* ab = accbuf.data() + size_t(g) * P * VB;
            if (run == 0) {
              const float* bp = bias + cb * VB;
#pragma GCC unroll 24
              for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
                for (int v = 0; v < NV; ++v) acc[p][v] = *(const vecu*)(bp + v * kLanes);
            } else {
#pragma GCC unroll 24
              for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
                for (int v = 0; v < NV; ++v) acc[p][v] = *(const vecu*)(ab + (p * NV + v) * kLanes);
            }
            for (int64_t ci = 0; ci < L; ++ci) {
              vec wv[NV];
#pragma GCC unroll 4
              for (int v = 0; v < NV; ++v) {
                wv[v] = *(const vecu*)(wp + ci * VB + v * kLanes);
                ANYTIMEIFY_PIN(wv[v]);
              }
#pragma GCC unroll 24
              for (int p = 0; p < P; ++p) {
                const float s = rows[p][ci];
#pragma GCC unroll 4
                for (int v = 0; v < NV; ++v) acc[p][v] += wv[v] * s;
              }
            }
            if (run + 1 < runs) {
#pragma GCC unroll 24
              for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
                for (int v = 0; v < NV; ++v) *(vecu*)(ab + (p * NV + v) * kLanes) = acc[p][v];
              continue;
            }
            const int64_t count = std::min<int64_t>(VB, cout - cb * VB);
            for (int p = 0; p < P; ++p) {
              const int q = g * P + p;
              if (valid[q])
                store_block<NV>(acc[p], kept[task * Q + q], cb * VB, count, cout, out, slots, side, res, relu, tail, stream);
            }
          }
        }
      }
    }
    if (stream) stream_fence();
  });
}


// The same convolution with each group's accumulators in registers over all its runs: no partial
// sums go to memory between kernel rows, which weighs most where runs are short (48 input channels
// x 3 taps = 144 floats; benchmarks/kernel_throughput.py compares the two kernels). Every
// position's run pointers (border runs copied to a zero-padded scratch) are set up before the
// accumulation, so no call clobbers the registers inside it. Groups of P positions are the
// parallel tasks.
template <int NV, int P>
void implicit_kernel_regs(const float* x, int64_t H, int64_t W, int64_t C, const float* packed, int64_t blocks,
                          int64_t taps, const float* bias, int64_t cout, const int64_t* kept, int64_t n, float* out,
                          int64_t oh, int64_t ow, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                          int64_t pw, int64_t dh, int64_t dw, const float* zeros, bool relu, const int32_t* slots,
                          float* side, const float* res, bool stream) {
  constexpr int VB = NV * kLanes;
  const bool rows_contiguous = dw == 1;
  const int64_t runs = rows_contiguous ? kh : kh * kw;
  const int64_t taps_per_run = rows_contiguous ? kw : 1;
  const int64_t L = taps_per_run * C;
  const int64_t groups = (n + P - 1) / P;
  const int64_t oplane = oh * ow;
  at::parallel_for(0, groups, 4, [&](int64_t g0, int64_t g1) {
    std::vector<float> scratch(static_cast<size_t>(P) * runs * L);
    std::vector<const float*> rows(static_cast<size_t>(runs) * P);
    alignas(64) float tail[VB];
    for (int64_t g = g0; g < g1; ++g) {
      bool valid[P];
      for (int p = 0; p < P; ++p) {
        const int64_t i = g * P + p;
        valid[p] = i < n;
        const int64_t idx = valid[p] ? kept[i] : 0;
        const int64_t r = idx % oplane;
        const int64_t by = (r / ow) * sh - ph, bx = (r % ow) * sw - pw;
        const int64_t plane = (idx / oplane) * H * W;
        for (int64_t run = 0; run < runs; ++run) {
          const int64_t ky = rows_contiguous ? run : run / kw;
          const int64_t kx0 = rows_contiguous ? 0 : run % kw;
          const int64_t iy = by + ky * dh;
          const float** slot_ptr = &rows[size_t(run) * P + p];
          if (!valid[p] || iy < 0 || iy >= H) { *slot_ptr = zeros; continue; }
          const int64_t ix0 = bx + kx0 * dw;
          const int64_t ix1 = ix0 + (taps_per_run - 1) * dw;
          const float* base = x + (plane + iy * W) * C;
          if (ix0 >= 0 && ix1 < W) { *slot_ptr = base + ix0 * C; continue; }
          float* sc = scratch.data() + (size_t(p) * runs + run) * L;
          for (int64_t k = 0; k < taps_per_run; ++k) {
            const int64_t ix = ix0 + k * dw;
            if (ix >= 0 && ix < W) std::memcpy(sc + k * C, base + ix * C, sizeof(float) * C);
            else std::memset(sc + k * C, 0, sizeof(float) * C);
          }
          *slot_ptr = sc;
        }
      }
      for (int64_t cb = 0; cb < blocks; ++cb) {
        vec acc[P][NV];
        const float* bp = bias + cb * VB;
#pragma GCC unroll 24
        for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc[p][v] = *(const vecu*)(bp + v * kLanes);
        for (int64_t run = 0; run < runs; ++run) {
          const float* wp = packed + (cb * taps + run * taps_per_run) * C * VB;
          const float* const* rp = rows.data() + size_t(run) * P;
          for (int64_t ci = 0; ci < L; ++ci) {
            vec wv[NV];
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) {
              wv[v] = *(const vecu*)(wp + ci * VB + v * kLanes);
              ANYTIMEIFY_PIN(wv[v]);
            }
#pragma GCC unroll 24
            for (int p = 0; p < P; ++p) {
              const float s = rp[p][ci];
#pragma GCC unroll 4
              for (int v = 0; v < NV; ++v) acc[p][v] += wv[v] * s;
            }
          }
        }
        const int64_t count = std::min<int64_t>(VB, cout - cb * VB);
        for (int p = 0; p < P; ++p)
          if (valid[p]) store_block<NV>(acc[p], kept[g * P + p], cb * VB, count, cout, out, slots, side, res, relu, tail, stream);
      }
    }
    if (stream) stream_fence();
  });
}

// out[kept[i]] = act(conv(x)[kept[i]] + bias [+ residual[kept[i]]]) for every kept output position
// (groups = 1). Rows with a slot (slots: int32 per output row, -1 for none; given where an
// activation or a residual follows) also keep conv + bias in side[slot] (side: (slots, C_out)),
// for the halo stencil to read.
//   x       (B, H, W, C_in) contiguous float32 (channels-last activations)
//   packed  (blocks, taps, C_in, VB) weights, VB one of this build's block widths (isa()["blocks"])
//   bias    (blocks * VB) float32 (zero padded)
//   out     (B * oh * ow, C_out) contiguous float32
//   variant 0: the kernel by shape (registers over the runs of a kernel with several rows, weights
//           shared in L1 for one run per position); 1, 2: one of the two (tests, benchmarks)
void implicit_conv(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& bias,
                   const torch::Tensor& kept_index, torch::Tensor out, int64_t oh, int64_t ow,
                   int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                   bool relu, const torch::Tensor& slots, torch::Tensor side, const torch::Tensor& residual,
                   int64_t variant) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 4 && x.is_contiguous(),
              "x must be a contiguous (B, H, W, C) float32 CPU tensor");
  TORCH_CHECK(packed.scalar_type() == torch::kFloat32 && packed.dim() == 4 && packed.is_contiguous(),
              "packed must be a contiguous (blocks, taps, C_in, VB) float32 tensor");
  TORCH_CHECK(variant >= 0 && variant <= 2, "variant must be 0 (by the kernel's shape), 1 (weights shared in L1) "
              "or 2 (accumulators in registers over every run), got ", variant);
  check_rows(out, "out");
  check_index(kept_index, "kept_index");
  const int64_t H = x.size(1), W = x.size(2), C = x.size(3);
  const int64_t blocks = packed.size(0), taps = packed.size(1), VB = packed.size(3);
  const int64_t cout = out.size(1);
  TORCH_CHECK(taps == kh * kw && packed.size(2) == C, "packed weights ", packed.sizes(), " do not match a ", kh, "x", kw,
              " kernel over ", C, " input channels");
  TORCH_CHECK(blocks * VB >= cout && (blocks - 1) * VB < cout, "packed weights cover ", blocks * VB,
              " output channels, the output has ", cout);
  TORCH_CHECK(bias.scalar_type() == torch::kFloat32 && bias.is_contiguous() && bias.numel() == blocks * VB,
              "bias must be a contiguous float32 vector of ", blocks * VB, " values");
  TORCH_CHECK(out.size(0) == x.size(0) * oh * ow, "out has ", out.size(0), " rows, expected ", x.size(0) * oh * ow);
  const float* res = optional_rows(residual, out.size(0), cout, "residual");
  const int32_t* slot = nullptr;
  float* side_rows = nullptr;
  side_rows_of(slots, side, out.size(0), cout, &slot, &side_rows);
  std::vector<float> zeros(kw * C, 0.0f);  // one run of taps outside the map
  // several runs per position (a kernel with more than one row or dilated columns): accumulators
  // stay in registers over all of them; a single run (1x1 convs) shares its weights in L1 across
  // groups of positions instead
  const bool regs = variant == 0 ? (dw == 1 ? kh : kh * kw) > 1 : variant == 2;
  const bool stream = out.numel() * int64_t(sizeof(float)) >= g_stream_min_bytes.load() && cout % kLanes == 0 &&
                      reinterpret_cast<uintptr_t>(out.data_ptr<float>()) % (sizeof(float) * kLanes) == 0;
#define ANYTIMEIFY_IMPLICIT(NV, P)                                                                              \
  (regs ? implicit_kernel_regs<NV, P> : implicit_kernel<NV, P>)(x.data_ptr<float>(), H, W, C, packed.data_ptr<float>(), blocks, taps,                  \
                         bias.data_ptr<float>(), cout, kept_index.data_ptr<int64_t>(), kept_index.numel(),        \
                         out.data_ptr<float>(), oh, ow, kh, kw, sh, sw, ph, pw, dh, dw, zeros.data(), relu, slot, \
                         side_rows, res, stream)
#define ANYTIMEIFY_CASE(WIDTH, P) \
  case WIDTH: ANYTIMEIFY_IMPLICIT(WIDTH / AT_LANES, P); break;
  switch (VB) {
    ANYTIMEIFY_BLOCKINGS(ANYTIMEIFY_CASE)
    default: TORCH_CHECK(false, "packed block width ", VB, " is not one of this build's (", ANYTIMEIFY_ISA,
                         ": see isa()['blocks'])");
  }
#undef ANYTIMEIFY_CASE
#undef ANYTIMEIFY_IMPLICIT
}

// ------------------------------------------------------------------ implicit GEMM, thin outputs
// For convs with few output channels (HRNet-W18's 18- and 36-channel branches, class maps) the
// channel-blocked kernel above wastes the padded lanes of its channel vectors (with 16 lanes, 18
// channels fill 32). This kernel vectorises over output positions instead: a block of 2 x AT_LANES
// consecutive positions of one output row (two vectors) and NC output channels keep 2 x NC
// accumulators in registers; each input value vector is reused for NC channels and each broadcast weight for
// both vectors. It needs the input in planar form along x: every input row a block reads is
// transposed once into a per-thread ring of kh planar rows (p[ci * PW + ix + pw], zero outside the
// map), which the next output rows reuse. Stride and dilation along x must be 1 (dilation 1 along
// y); blocks start at a kept position, so runs of kept positions waste at most one partial block.
// Weights are packed (kh, kw, C_in, CP) with CP = chunks * NC output channels, zero padded.
namespace {

// One level of a kLanes x kLanes transpose: row r (bit S clear) and row r + S exchange the elements at the
// columns with bit S set (in r) against those with it clear (in r + S).
template <int S>
inline void transpose_level(vec* m) {
  veci ma, mb;
  for (int c = 0; c < kLanes; ++c) {
    ma[c] = (c & S) ? kLanes + c - S : c;
    mb[c] = (c & S) ? kLanes + c : c + S;
  }
  for (int r = 0; r < kLanes; ++r) {
    if (r & S) continue;
    const vec a = m[r], b = m[r + S];
    m[r] = __builtin_shuffle(a, b, ma);
    m[r + S] = __builtin_shuffle(a, b, mb);
  }
}

// The whole transpose: levels S, S/2, ..., 1.
template <int S>
inline void transpose_levels(vec* m) {
  transpose_level<S>(m);
  if constexpr (S > 1) transpose_levels<S / 2>(m);
}

// One channels-last input row (W positions of C floats) as planar rows p[ci * PW + ix + pw], the
// rest of each planar row zero; kLanes x kLanes tiles go through registers.
void planar_row(const float* src, int64_t W, int64_t C, float* p, int64_t PW, int64_t pw) {
  for (int64_t ci = 0; ci < C; ++ci) {
    float* d = p + ci * PW;
    std::memset(d, 0, sizeof(float) * pw);
    std::memset(d + W + pw, 0, sizeof(float) * (PW - W - pw));
  }
  const int64_t CL = C & ~int64_t(kLanes - 1), WL = W & ~int64_t(kLanes - 1);
  for (int64_t ix0 = 0; ix0 < WL; ix0 += kLanes) {
    for (int64_t c0 = 0; c0 < CL; c0 += kLanes) {
      vec m[kLanes];
      for (int k = 0; k < kLanes; ++k) m[k] = *(const vecu*)(src + (ix0 + k) * C + c0);
      transpose_levels<kLanes / 2>(m);
      for (int k = 0; k < kLanes; ++k) *(vecu*)(p + (c0 + k) * PW + ix0 + pw) = m[k];
    }
    for (int64_t ix = ix0; ix < ix0 + kLanes; ++ix)
      for (int64_t ci = CL; ci < C; ++ci) p[ci * PW + ix + pw] = src[ix * C + ci];
  }
  for (int64_t ix = WL; ix < W; ++ix)
    for (int64_t ci = 0; ci < C; ++ci) p[ci * PW + ix + pw] = src[ix * C + ci];
}

template <int NC>
void rows_kernel(const float* x, int64_t H, int64_t W, int64_t C, const float* packed, int64_t CP,
                 const float* bias, int64_t cout, const int64_t* kept, int64_t n, float* out, int64_t oh,
                 int64_t ow, int64_t kh, int64_t kw, int64_t sh, int64_t ph, int64_t pw, bool relu,
                 const int32_t* slots, float* side, const float* res) {
  constexpr int NB = 2;            // vectors of kLanes positions per block
  constexpr int BW = kLanes * NB;  // positions per block
  const int64_t PW = ow + BW - 1 + kw - 1;  // planar row length: every block reads within it
  // tasks: equal shares of the kept positions (masks are clustered, rows are not equally kept)
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(n / 256, int64_t(at::get_num_threads()) * 8));
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> ring(size_t(kh) * C * PW);
    std::vector<int64_t> tag(kh, -1);  // the input row (b * H + iy) each ring slot holds
    std::vector<const float*> planes(kh);
    alignas(64) float buf[NB][NC][kLanes];
    for (int64_t task = t0; task < t1; ++task) {
      int64_t i = n * task / tasks;
      const int64_t i_end = n * (task + 1) / tasks;
      int64_t current = -1;
      while (i < i_end) {
        const int64_t r = kept[i] / ow;  // output row b * oh + y
        const int64_t row0 = r * ow;
        const int64_t x0 = kept[i] - row0;  // a block: up to BW positions of this row from a kept one
        const int64_t stop = row0 + std::min<int64_t>(x0 + BW, ow);
        uint64_t lanes = 0;
        int64_t j = i;
        for (; j < i_end && kept[j] < stop; ++j) lanes |= uint64_t(1) << (kept[j] - row0 - x0);
        if (r != current) {
          current = r;
          const int64_t b = r / oh, y = r % oh;
          for (int64_t ky = 0; ky < kh; ++ky) {
            const int64_t iy = y * sh - ph + ky;
            if (iy < 0 || iy >= H) { planes[ky] = nullptr; continue; }  // zero padding: no terms
            const int64_t id = b * H + iy;
            const int64_t slot = iy % kh;  // the kh rows of one output row fall in distinct slots
            float* p = ring.data() + size_t(slot) * C * PW;
            planes[ky] = p;
            if (tag[slot] != id) {
              planar_row(x + id * W * C, W, C, p, PW, pw);
              tag[slot] = id;
            }
          }
        }
        // a block whose kept positions all lie in its first vector computes that vector only
        // (short runs of kept positions: half the multiply-adds)
        auto compute = [&](int64_t c0, auto vectors) {
          constexpr int NV = decltype(vectors)::value;
          vec acc[NV][NC];
#pragma GCC unroll 12
          for (int co = 0; co < NC; ++co)
            for (int v = 0; v < NV; ++v) acc[v][co] = vec{} + bias[c0 + co];
          for (int64_t ky = 0; ky < kh; ++ky) {
            const float* p = planes[ky];
            if (p == nullptr) continue;
            for (int64_t ci = 0; ci < C; ++ci) {
              const float* pr = p + ci * PW + x0;
              const float* wc = packed + (ky * kw * C + ci) * CP + c0;
              for (int64_t kx = 0; kx < kw; ++kx) {
                vec in[NV];
                for (int v = 0; v < NV; ++v) {
                  in[v] = *(const vecu*)(pr + kx + kLanes * v);
                  ANYTIMEIFY_PIN(in[v]);
                }
                const float* wp = wc + kx * C * CP;
#pragma GCC unroll 12
                for (int co = 0; co < NC; ++co) {
                  const float w = wp[co];
                  for (int v = 0; v < NV; ++v) acc[v][co] += in[v] * w;
                }
              }
            }
          }
#pragma GCC unroll 12
          for (int co = 0; co < NC; ++co)
            for (int v = 0; v < NV; ++v) *(vec*)buf[v][co] = acc[v][co];
        };
        const bool second = (lanes >> kLanes) != 0;
        for (int64_t c0 = 0; c0 < CP; c0 += NC) {
          if (second) compute(c0, std::integral_constant<int, NB>{});
          else compute(c0, std::integral_constant<int, 1>{});
          const int64_t count = std::min<int64_t>(NC, cout - c0);
          for (uint64_t m = lanes; m; m &= m - 1) {
            const int lane = __builtin_ctzll(m);
            const int64_t row = row0 + x0 + lane;
            const float* block = &buf[lane / kLanes][0][lane % kLanes];
            float* dst = out + row * cout + c0;
            // the stencil still reads this row: keep y + shift before the residual and activation
            float* keep = (slots != nullptr && slots[row] >= 0) ? side + int64_t(slots[row]) * cout + c0 : nullptr;
            const float* rr = res != nullptr ? res + row * cout + c0 : nullptr;
            for (int64_t co = 0; co < count; ++co) {
              float v = block[co * kLanes];
              if (keep) keep[co] = v;
              if (rr) v += rr[co];
              dst[co] = relu ? std::max(v, 0.0f) : v;
            }
          }
        }
        i = j;
      }
    }
  });
}

}  // namespace

// out[kept[i]] = act(conv(x)[kept[i]] + bias [+ residual[kept[i]]]), like implicit_conv, for
// convs with stride 1 and dilation 1 along x and dilation 1 along y (groups = 1), vectorised over
// output positions (see above). Arguments as implicit_conv's, except:
//   packed  (kh, kw, C_in, CP) weights, CP a multiple of nc >= C_out, zero padded
//   bias    (CP) float32 (zero padded)
//   nc      output channels per chunk: one of this build's (isa()["row_chunks"]: 4 and 6 with 16
//           vector registers, up to 12 with 32)
void implicit_rows(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& bias,
                   const torch::Tensor& kept_index, torch::Tensor out, int64_t oh, int64_t ow, int64_t sh,
                   int64_t ph, int64_t pw, int64_t nc, bool relu, const torch::Tensor& slots, torch::Tensor side,
                   const torch::Tensor& residual) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 4 && x.is_contiguous(),
              "x must be a contiguous (B, H, W, C) float32 CPU tensor");
  TORCH_CHECK(packed.scalar_type() == torch::kFloat32 && packed.dim() == 4 && packed.is_contiguous(),
              "packed must be a contiguous (kh, kw, C_in, CP) float32 tensor");
  check_rows(out, "out");
  check_index(kept_index, "kept_index");
  const int64_t H = x.size(1), W = x.size(2), C = x.size(3);
  const int64_t kh = packed.size(0), kw = packed.size(1), CP = packed.size(3);
  const int64_t cout = out.size(1);
  TORCH_CHECK(packed.size(2) == C, "packed weights ", packed.sizes(), " do not match ", C, " input channels");
  TORCH_CHECK(nc > 0 && CP % nc == 0 && CP >= cout && CP - nc < cout, "packed weights cover ", CP,
              " output channels in chunks of ", nc, ", the output has ", cout);
  TORCH_CHECK(bias.scalar_type() == torch::kFloat32 && bias.is_contiguous() && bias.numel() == CP,
              "bias must be a contiguous float32 vector of ", CP, " values");
  TORCH_CHECK(sh >= 1 && ph >= 0 && pw >= 0 && ow == W + 2 * pw - kw + 1 && oh == (H + 2 * ph - kh) / sh + 1,
              "output size ", oh, "x", ow, " does not match a ", kh, "x", kw, " kernel (stride ", sh,
              ", 1) over ", H, "x", W, " with padding ", ph, ", ", pw);
  TORCH_CHECK(out.size(0) == x.size(0) * oh * ow, "out has ", out.size(0), " rows, expected ", x.size(0) * oh * ow);
  const float* res = optional_rows(residual, out.size(0), cout, "residual");
  const int32_t* slot = nullptr;
  float* side_rows = nullptr;
  side_rows_of(slots, side, out.size(0), cout, &slot, &side_rows);
#define ANYTIMEIFY_ROWS(NC)                                                                                    \
  case NC:                                                                                                     \
    rows_kernel<NC>(x.data_ptr<float>(), H, W, C, packed.data_ptr<float>(), CP, bias.data_ptr<float>(), cout, \
                    kept_index.data_ptr<int64_t>(), kept_index.numel(), out.data_ptr<float>(), oh, ow, kh, kw, \
                    sh, ph, pw, relu, slot, side_rows, res);                                                  \
    break;
  switch (nc) {
    ANYTIMEIFY_ROW_CHUNKS(ANYTIMEIFY_ROWS)
    default: TORCH_CHECK(false, "output channels per chunk ", nc, " is not one of this build's (", ANYTIMEIFY_ISA,
                         ": see isa()['row_chunks'])");
  }
#undef ANYTIMEIFY_ROWS
}

// ------------------------------------------------------------------------- branch fusion
// HRNet's fusion of its branches (exits.fuse_branches): every feature map bilinearly resized to the
// first one's size and all of them concatenated along channels, in one pass that writes each
// channels-last output row once (instead of one resized copy per branch and a concatenation).
// Index and weight computation follow PyTorch's upsample_bilinear2d for an explicit output size.
namespace {

struct Axis {
  std::vector<int64_t> lo, hi;
  std::vector<float> w_lo, w_hi;
};

Axis bilinear_axis(int64_t in, int64_t out, bool align_corners) {
  Axis a;
  a.lo.resize(out); a.hi.resize(out); a.w_lo.resize(out); a.w_hi.resize(out);
  float scale;
  if (align_corners) scale = out > 1 ? float(in - 1) / float(out - 1) : 0.0f;
  else scale = float(in) / float(out);
  for (int64_t d = 0; d < out; ++d) {
    float src = align_corners ? scale * d : std::max(scale * (d + 0.5f) - 0.5f, 0.0f);
    int64_t i0 = std::min<int64_t>(int64_t(src), in - 1);
    int64_t step = i0 < in - 1 ? 1 : 0;
    float l1 = std::min(std::max(src - float(i0), 0.0f), 1.0f);
    a.lo[d] = i0; a.hi[d] = i0 + step; a.w_lo[d] = 1.0f - l1; a.w_hi[d] = l1;
  }
  return a;
}

}  // namespace

namespace {

// Every feature map bilinearly resized to H x W and concatenated along channels (NHWC, pooled).
torch::Tensor resize_concat(const std::vector<torch::Tensor>& features, bool align_corners, int64_t H, int64_t W) {
  TORCH_CHECK(!features.empty(), "fuse_branches needs at least one feature map");
  for (const auto& f : features)
    TORCH_CHECK(f.device().is_cpu() && f.scalar_type() == torch::kFloat32 && f.dim() == 4 && f.is_contiguous(),
                "feature maps must be contiguous (B, H, W, C) float32 CPU tensors");
  TORCH_CHECK(H > 0 && W > 0, "the output size must be positive, got ", H, "x", W);
  const int64_t B = features[0].size(0);
  int64_t total = 0;
  for (const auto& f : features) {
    TORCH_CHECK(f.size(0) == B, "feature maps must share the batch size");
    total += f.size(3);
  }
  auto out = pooled_empty({B, H, W, total});
  const size_t n = features.size();
  std::vector<Axis> ys(n), xs(n);
  std::vector<int64_t> offsets(n);
  int64_t offset = 0;
  for (size_t i = 0; i < n; ++i) {
    ys[i] = bilinear_axis(features[i].size(1), H, align_corners);
    xs[i] = bilinear_axis(features[i].size(2), W, align_corners);
    offsets[i] = offset;
    offset += features[i].size(3);
  }
  float* dst_base = out.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / H, y = r % H;
      for (size_t i = 0; i < n; ++i) {
        const auto& f = features[i];
        const int64_t h = f.size(1), w = f.size(2), C = f.size(3);
        const float* src = f.data_ptr<float>() + b * h * w * C;
        float* dst = dst_base + (r * W) * total + offsets[i];
        if (h == H && w == W) {  // the first branch (or any of the same size): a copy
          const float* row = src + y * W * C;
          for (int64_t x = 0; x < W; ++x) std::memcpy(dst + x * total, row + x * C, sizeof(float) * C);
          continue;
        }
        const float* top = src + ys[i].lo[y] * w * C;
        const float* bottom = src + ys[i].hi[y] * w * C;
        const float wt = ys[i].w_lo[y], wb = ys[i].w_hi[y];
        for (int64_t x = 0; x < W; ++x) {
          const int64_t x0 = xs[i].lo[x] * C, x1 = xs[i].hi[x] * C;
          const float wl = xs[i].w_lo[x], wr = xs[i].w_hi[x];
          const float* a = top + x0;
          const float* bb = top + x1;
          const float* c = bottom + x0;
          const float* d = bottom + x1;
          float* o = dst + x * total;
#pragma omp simd
          for (int64_t k = 0; k < C; ++k) o[k] = wt * (wl * a[k] + wr * bb[k]) + wb * (wl * c[k] + wr * d[k]);
        }
      }
    }
  });
  return out;
}

}  // namespace

torch::Tensor fuse_branches(const std::vector<torch::Tensor>& features, bool align_corners) {
  TORCH_CHECK(!features.empty(), "fuse_branches needs at least one feature map");
  return resize_concat(features, align_corners, features[0].size(1), features[0].size(2));
}

// Bilinear resize of one NHWC map to out_h x out_w (as F.interpolate with that size), pooled output.
torch::Tensor resize_bilinear(const torch::Tensor& x, int64_t out_h, int64_t out_w, bool align_corners) {
  return resize_concat({x}, align_corners, out_h, out_w);
}

// 2x2 average pooling with stride 2 (floor mode, no padding) of an NHWC map, pooled output.
torch::Tensor avg_pool2x2(const torch::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 4 && x.is_contiguous(),
              "x must be a contiguous (B, H, W, C) float32 CPU tensor");
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  const int64_t oh = H / 2, ow = W / 2;
  auto out = pooled_empty({B, oh, ow, C});
  const float* src = x.data_ptr<float>();
  float* dst_base = out.data_ptr<float>();
  at::parallel_for(0, B * oh, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / oh, y = r % oh;
      const float* top = src + ((b * H + 2 * y) * W) * C;
      const float* bottom = top + W * C;
      float* dst = dst_base + r * ow * C;
      for (int64_t xo = 0; xo < ow; ++xo) {
        const float* a = top + 2 * xo * C;
        const float* c = bottom + 2 * xo * C;
        float* o = dst + xo * C;
#pragma omp simd
        for (int64_t k = 0; k < C; ++k) o[k] = ((a[k] + a[k + C]) + (c[k] + c[k + C])) * 0.25f;
      }
    }
  });
  return out;
}

// out += residual, then an optional ReLU, in one pass (both (rows, channels) views of channels-last maps).
void add_residual(torch::Tensor out, const torch::Tensor& residual, bool relu) {
  check_rows(out, "out");
  check_rows(residual, "residual");
  TORCH_CHECK(out.sizes() == residual.sizes(), "residual ", residual.sizes(), " does not match the output ", out.sizes());
  float* o = out.data_ptr<float>();
  const float* r = residual.data_ptr<float>();
  const int64_t total = out.numel();
  at::parallel_for(0, total, 1 << 16, [&](int64_t begin, int64_t end) {
    if (relu) {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) o[i] = std::max(o[i] + r[i], 0.0f);
    } else {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) o[i] += r[i];
    }
  });
}

// ------------------------------------------------------------------------------- fuse_sum
// fuse_sum works a row of the output at a time (W x C contiguous floats, a few KiB to 100 KiB): every
// term gives the row as W x C contiguous values, and one vectorised pass adds them left to right and
// applies the ReLU. A nearest term whose columns are the identity (same width, xs[x] == x: the
// branch itself, and the outputs of the downsampling convs) is its source row as it is; any other
// nearest term is its source row with the columns gathered (xs) into a scratch row; a bilinear term
// is its two source rows interpolated along x into scratch rows, then weighted along y in the pass.
// Scratch rows are kept per source row, so an upsampling term gathers or interpolates each of its
// source rows once for the 2, 4 or 8 output rows that read it. (A loop over the pixels, adding C
// channels per term, vectorised badly at HRNet's C = 18 or 36, and GCC made its ReLU a branch per
// value, mispredicted on half of them: HRNet-W18-Small-v2 at 512x1024 spent 0.07-0.10 s per forward
// in fuse_sum against 0.016 s now, benchmarks/ca_speedup.py --profile on 2 threads.)
namespace {

// One term of fuse_sum as the row pass reads it.
struct SumTerm {
  const float* data;  // (B, h, w, C)
  int64_t numel;      // B * h * w * C: the whole-vector copies of a column stop short of the end
  int64_t h, w;
  const int64_t* ys;  // source rows: (H) nearest, (2, H) bilinear
  const int64_t* xs;  // source columns: (W) nearest, (2, W) bilinear
  const float* yw;    // bilinear weights along y (2, H) and x (2, W); null for nearest
  const float* xw;
  bool bilinear;
  bool direct;  // nearest with the identity columns: output row y is its source row ys[y]
};

// One term's values of one output row: a, or wa * a + wb * b (bilinear; a and b the x-interpolated
// top and bottom source rows).
struct RowTerm {
  const float* a;
  const float* b;
  float wa, wb;
  bool bilinear;
};

// A scratch row (W x C floats and a vector of padding) and the source row it holds (-1: none).
struct ScratchRow {
  float* data;
  int64_t key;
};

// dst[x * C + c] = src[cols[x] * C + c]: whole vectors per column where the source has them (`avail`
// floats from src on; the last vector of a column runs into the next column of dst, written after
// it, or into the padding).
inline void gather_columns(float* dst, const float* src, const int64_t* cols, int64_t W, int64_t C, int64_t avail) {
  const int64_t span = (C + kLanes - 1) / kLanes * kLanes;
  for (int64_t x = 0; x < W; ++x) {
    const float* s = src + cols[x] * C;
    float* d = dst + x * C;
    if (cols[x] * C + span <= avail) {
      for (int64_t c = 0; c < span; c += kLanes) *(vecu*)(d + c) = *(const vecu*)(s + c);
    } else {
      for (int64_t c = 0; c < C; ++c) d[c] = s[c];
    }
  }
}

// dst[x * C + c] = wl[x] * src[x0[x] * C + c] + wr[x] * src[x1[x] * C + c], wl, wr = wts[x], wts[W + x]
// and x0, x1 = cols[x], cols[W + x] (PyTorch's upsample_bilinear2d tables), whole vectors as above.
inline void lerp_columns(float* dst, const float* src, const int64_t* cols, const float* wts, int64_t W, int64_t C,
                         int64_t avail) {
  const int64_t span = (C + kLanes - 1) / kLanes * kLanes;
  for (int64_t x = 0; x < W; ++x) {
    const float *a = src + cols[x] * C, *b = src + cols[W + x] * C;
    const float wl = wts[x], wr = wts[W + x];
    float* d = dst + x * C;
    if (std::max(cols[x], cols[W + x]) * C + span <= avail) {
      for (int64_t c = 0; c < span; c += kLanes)
        *(vecu*)(d + c) = wl * *(const vecu*)(a + c) + wr * *(const vecu*)(b + c);
    } else {
      for (int64_t c = 0; c < C; ++c) d[c] = wl * a[c] + wr * b[c];
    }
  }
}

inline vec row_term(const RowTerm& t, int64_t k) {
  const vec a = *(const vecu*)(t.a + k);
  return t.bilinear ? t.wa * a + t.wb * *(const vecu*)(t.b + k) : a;
}

inline float row_term_at(const RowTerm& t, int64_t k) {
  return t.bilinear ? t.wa * t.a[k] + t.wb * t.b[k] : t.a[k];
}

// o[k] = act(t0[k] + t1[k] + ...) over a row of len floats, the terms added left to right.
template <bool RELU>
void sum_row(float* o, const RowTerm* terms, size_t n, int64_t len) {
  const vec zero = {};
  int64_t k = 0;
  for (; k + 2 * kLanes <= len; k += 2 * kLanes) {
    vec acc0 = row_term(terms[0], k), acc1 = row_term(terms[0], k + kLanes);
    for (size_t j = 1; j < n; ++j) {
      acc0 += row_term(terms[j], k);
      acc1 += row_term(terms[j], k + kLanes);
    }
    if (RELU) {  // NaN stays NaN, as in torch.relu
      acc0 = acc0 < zero ? zero : acc0;
      acc1 = acc1 < zero ? zero : acc1;
    }
    *(vecu*)(o + k) = acc0;
    *(vecu*)(o + k + kLanes) = acc1;
  }
  for (; k < len; ++k) {
    float acc = row_term_at(terms[0], k);
    for (size_t j = 1; j < n; ++j) acc += row_term_at(terms[j], k);
    o[k] = RELU && acc < 0.0f ? 0.0f : acc;
  }
}

}  // namespace

// HRNet's fuse layers: act(t0 + t1' + t2' + ...), the terms added left to right as PyTorch's chain
// of additions does, where tj' is tj resized to H x W: nearest neighbour (read at rows ys[j] and
// columns xs[j]; identity indices for a term of the output's size) or bilinear (rows ys[j][0, y]
// and ys[j][1, y] weighted yw[j][0, y] and yw[j][1, y], the same along x: the tables of
// PyTorch's upsample_bilinear2d). One pass writes each output row once, instead of one resized
// copy per term plus one pass per addition and one for the ReLU.
//   terms  (B, h_j, w_j, C) contiguous float32 CPU tensors (channels-last activations)
//   ys, xs int64 source rows / columns per term: (H) and (W) for nearest, (2, H) and (2, W) bilinear
//   yw, xw float32 (2, H) and (2, W) bilinear weights per term; empty tensors for nearest terms
torch::Tensor fuse_sum(const std::vector<torch::Tensor>& terms, const std::vector<torch::Tensor>& ys,
                       const std::vector<torch::Tensor>& xs, const std::vector<torch::Tensor>& yw,
                       const std::vector<torch::Tensor>& xw, int64_t H, int64_t W, bool relu) {
  const size_t n = terms.size();
  TORCH_CHECK(n > 0 && ys.size() == n && xs.size() == n && yw.size() == n && xw.size() == n,
              "fuse_sum needs row and column indices and weights for every term");
  const int64_t B = terms[0].size(0), C = terms[0].size(3);
  std::vector<SumTerm> info(n);
  size_t scratch_rows = 0;
  for (size_t j = 0; j < n; ++j) {
    const auto& t = terms[j];
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.dim() == 4 && t.is_contiguous(),
                "terms must be contiguous (B, H, W, C) float32 CPU tensors");
    TORCH_CHECK(t.size(0) == B && t.size(3) == C, "terms must share the batch size and channels, got ", t.sizes());
    check_index(ys[j], "ys");
    check_index(xs[j], "xs");
    const bool bilinear = yw[j].numel() > 0;
    const int64_t taps = bilinear ? 2 : 1;
    TORCH_CHECK(ys[j].numel() == taps * H && xs[j].numel() == taps * W, "index tables must have ", taps, " x ", H,
                " and ", taps, " x ", W, " entries");
    if (bilinear) {
      for (const auto* w : {&yw[j], &xw[j]})
        TORCH_CHECK(w->scalar_type() == torch::kFloat32 && w->is_contiguous(), "weights must be contiguous float32");
      TORCH_CHECK(yw[j].numel() == 2 * H && xw[j].numel() == 2 * W, "weight tables must have 2 x ", H, " and 2 x ",
                  W, " entries");
    }
    const int64_t* y = ys[j].data_ptr<int64_t>();
    const int64_t* x = xs[j].data_ptr<int64_t>();
    for (int64_t i = 0; i < taps * H; ++i) TORCH_CHECK(y[i] >= 0 && y[i] < t.size(1), "row index out of range");
    for (int64_t i = 0; i < taps * W; ++i) TORCH_CHECK(x[i] >= 0 && x[i] < t.size(2), "column index out of range");
    SumTerm& s = info[j];
    s.data = t.data_ptr<float>();
    s.numel = t.numel();
    s.h = t.size(1);
    s.w = t.size(2);
    s.ys = y;
    s.xs = x;
    s.yw = bilinear ? yw[j].data_ptr<float>() : nullptr;
    s.xw = bilinear ? xw[j].data_ptr<float>() : nullptr;
    s.bilinear = bilinear;
    s.direct = !bilinear && s.w == W;
    for (int64_t i = 0; s.direct && i < W; ++i) s.direct = x[i] == i;
    scratch_rows += s.direct ? 0 : bilinear ? 2 : 1;
  }
  auto out = pooled_empty({B, H, W, C});
  float* dst_base = out.data_ptr<float>();
  const int64_t len = W * C, stride = (len + kLanes + 15) / 16 * 16;  // a scratch row: the row, padding, 64 B aligned
  at::parallel_for(0, B * H, 1, [&](int64_t r0, int64_t r1) {
    std::unique_ptr<float[]> scratch(scratch_rows ? new float[stride * scratch_rows + 16] : nullptr);
    float* aligned = scratch.get() + (16 - reinterpret_cast<uintptr_t>(scratch.get()) / 4 % 16) % 16;
    // each term's scratch rows: first[j] and, bilinear, first[j] + 1
    std::vector<ScratchRow> rows(scratch_rows);
    std::vector<size_t> first(n);
    for (size_t j = 0, next = 0; j < n; ++j) {
      first[j] = next;
      next += info[j].direct ? 0 : info[j].bilinear ? 2 : 1;
    }
    for (size_t i = 0; i < scratch_rows; ++i) rows[i] = {aligned + i * stride, -1};
    std::vector<RowTerm> row_terms(n);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / H, y = r % H;
      for (size_t j = 0; j < n; ++j) {
        const SumTerm& s = info[j];
        RowTerm& t = row_terms[j];
        t.bilinear = s.bilinear;
        if (s.direct) {
          t.a = s.data + (b * s.h + s.ys[y]) * s.w * C;
          continue;
        }
        if (!s.bilinear) {
          ScratchRow& row = rows[first[j]];
          const int64_t key = b * s.h + s.ys[y];
          if (row.key != key) {
            const int64_t at = key * s.w * C;
            gather_columns(row.data, s.data + at, s.xs, W, C, s.numel - at);
            row.key = key;
          }
          t.a = row.data;
          continue;
        }
        // bilinear: the top and bottom source rows, each interpolated along x once while in a slot
        const int64_t keys[2] = {b * s.h + s.ys[y], b * s.h + s.ys[H + y]};
        const float* got[2];
        for (int i = 0; i < 2; ++i) {
          ScratchRow* slot = &rows[first[j]];
          if (slot[0].key == keys[i]) {
            got[i] = slot[0].data;
            continue;
          }
          if (slot[1].key == keys[i]) {
            got[i] = slot[1].data;
            continue;
          }
          ScratchRow& spare = slot[0].key == keys[1 - i] ? slot[1] : slot[0];  // keep the other row needed
          const int64_t at = keys[i] * s.w * C;
          lerp_columns(spare.data, s.data + at, s.xs, s.xw, W, C, s.numel - at);
          spare.key = keys[i];
          got[i] = spare.data;
        }
        t.a = got[0];
        t.b = got[1];
        t.wa = s.yw[y];
        t.wb = s.yw[H + y];
      }
      float* dst = dst_base + r * len;
      if (relu)
        sum_row<true>(dst, row_terms.data(), n, len);
      else
        sum_row<false>(dst, row_terms.data(), n, len);
    }
  });
  return out;
}

// ------------------------------------------------------------------------------- mask plans
// The index lists of a mask plan (anytimeify/masking/plans.py, whose PyTorch code is the reference):
// one pass over the (B, H, W) keep map instead of a max-pool, a nonzero and index arithmetic over
// the whole map per list. `near(b, y, x, want)`: whether a position within `radius` (Chebyshev
// distance, inside the map) has keep == want.
namespace {

inline bool near_value(const bool* keep, int64_t H, int64_t W, int64_t y, int64_t x, int64_t radius, bool want) {
  const int64_t y0 = std::max<int64_t>(0, y - radius), y1 = std::min<int64_t>(H - 1, y + radius);
  const int64_t x0 = std::max<int64_t>(0, x - radius), x1 = std::min<int64_t>(W - 1, x + radius);
  for (int64_t yy = y0; yy <= y1; ++yy) {
    const bool* row = keep + yy * W;
    for (int64_t xx = x0; xx <= x1; ++xx)
      if (row[xx] == want) return true;
  }
  return false;
}

void check_keep(const torch::Tensor& keep, int64_t radius) {
  TORCH_CHECK(keep.device().is_cpu() && keep.scalar_type() == torch::kBool && keep.dim() == 3 && keep.is_contiguous(),
              "keep must be a contiguous (B, H, W) bool CPU tensor");
  TORCH_CHECK(radius >= 0, "radius must be at least 0, got ", radius);
}

}  // namespace

// The interpolation halo: skipped positions with a kept one within `radius`, in index order, and
// the flat indices of their non-centre taps (row-major offsets; a tap outside the map points at
// the halo position itself).
std::vector<torch::Tensor> halo_lists(const torch::Tensor& keep, int64_t radius) {
  check_keep(keep, radius);
  const int64_t B = keep.size(0), H = keep.size(1), W = keep.size(2), plane = H * W;
  const bool* k = keep.data_ptr<bool>();
  std::vector<int64_t> halo;
  for (int64_t b = 0; b < B; ++b) {
    const bool* map = k + b * plane;
    for (int64_t y = 0; y < H; ++y)
      for (int64_t x = 0; x < W; ++x)
        if (!map[y * W + x] && near_value(map, H, W, y, x, radius, true)) halo.push_back(b * plane + y * W + x);
  }
  const int64_t M = static_cast<int64_t>(halo.size()), side = 2 * radius + 1, T = side * side - 1;
  auto halo_t = torch::empty({M}, torch::kInt64);
  auto neighbours = torch::empty({M, T}, torch::kInt64);
  int64_t* h = halo_t.data_ptr<int64_t>();
  int64_t* n = neighbours.data_ptr<int64_t>();
  for (int64_t i = 0; i < M; ++i) {
    const int64_t p = halo[i], b = p / plane, y = p % plane / W, x = p % W;
    h[i] = p;
    int64_t t = 0;
    for (int64_t dy = -radius; dy <= radius; ++dy)
      for (int64_t dx = -radius; dx <= radius; ++dx) {
        if (dy == 0 && dx == 0) continue;
        const int64_t yy = y + dy, xx = x + dx;
        n[i * T + t++] = (yy >= 0 && yy < H && xx >= 0 && xx < W) ? b * plane + yy * W + xx : p;
      }
  }
  return {halo_t, neighbours};
}

// The kept positions the halo stencil reads (a skipped position within `radius`): a (B*H*W,) int32
// map holding 0..count-1 at them in index order and -1 elsewhere, and count.
std::tuple<torch::Tensor, int64_t> boundary_slots(const torch::Tensor& keep, int64_t radius) {
  check_keep(keep, radius);
  const int64_t B = keep.size(0), H = keep.size(1), W = keep.size(2), plane = H * W;
  const bool* k = keep.data_ptr<bool>();
  auto slots = torch::empty({B * plane}, torch::kInt32);
  int32_t* s = slots.data_ptr<int32_t>();
  int64_t count = 0;
  for (int64_t b = 0; b < B; ++b) {
    const bool* map = k + b * plane;
    for (int64_t y = 0; y < H; ++y)
      for (int64_t x = 0; x < W; ++x) {
        const bool boundary = map[y * W + x] && near_value(map, H, W, y, x, radius, false);
        s[b * plane + y * W + x] = boundary ? static_cast<int32_t>(count++) : -1;
      }
  }
  return {slots, count};
}

// What this build targets: the ISA, vector lanes and registers, and the block widths its kernels
// take (the engine packs weights for them).
pybind11::dict isa() {
  pybind11::dict info;
  info["isa"] = ANYTIMEIFY_ISA;
  info["lanes"] = AT_LANES;
  info["registers"] = AT_REGS;
  pybind11::list blocks, positions, chunks;
#define ANYTIMEIFY_LIST(WIDTH, P) blocks.append(WIDTH); positions.append(P);
  ANYTIMEIFY_BLOCKINGS(ANYTIMEIFY_LIST)
#undef ANYTIMEIFY_LIST
#define ANYTIMEIFY_LIST(NC) chunks.append(NC);
  ANYTIMEIFY_ROW_CHUNKS(ANYTIMEIFY_LIST)
#undef ANYTIMEIFY_LIST
  info["blocks"] = blocks;
  info["block_positions"] = positions;
  info["row_chunks"] = chunks;
  info["row_block"] = 2 * AT_LANES;
  return info;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("masked_output", &masked_output, "Output rows holding fill except the kept ones (left uninitialised)");
  m.def("fill_skipped", &fill_skipped, "Rows not kept set to fill, in place");
  m.def("set_stream_min_bytes", [](int64_t bytes) { return g_stream_min_bytes.exchange(bytes); },
        "Outputs of at least this many bytes get streaming stores from the implicit GEMMs; returns the previous value");
  m.def("halo_stencil", &halo_stencil, "RBF interpolation on the halo rows with the layer's shift, in place");
  m.def("add_residual", &add_residual, "out += residual, then an optional ReLU, in place");
  m.def("fuse_branches", &fuse_branches, "Bilinear resize of every branch to the first's size, concatenated (NHWC)");
  m.def("resize_bilinear", &resize_bilinear, "Bilinear resize of one map to a given size (NHWC)");
  m.def("avg_pool2x2", &avg_pool2x2, "2x2 average pooling, stride 2 (NHWC)");
  m.def("halo_lists", &halo_lists, "A mask plan's interpolation halo and its taps' flat indices");
  m.def("boundary_slots", &boundary_slots, "A mask plan's kept positions next to a skipped one, numbered");
  m.def("fuse_sum", &fuse_sum, "act(sum of nearest- or bilinear-resized terms), HRNet's fuse layers, in one pass (NHWC)");
  m.def("pooled_empty", &pooled_empty, "Uninitialised float32 CPU tensor, from the buffer pool when large");
  m.def("set_pool_limit", &set_pool_limit, "Bytes of unused buffers the pool keeps (0: off); returns the previous");
  m.def("set_pool_min_bytes", &set_pool_min_bytes, "Smallest output size taken from the pool; returns the previous");
  m.def("release_pool", &release_pool, "Return every unused pooled buffer to the system");
  m.def("pool_stats", &pool_stats, "(unused bytes, unused buffers, hits, misses, limit) of the buffer pool");
  m.def("implicit_conv", &implicit_conv, "Convolution at the kept output positions, written into their rows");
  m.def("implicit_rows", &implicit_rows, "implicit_conv vectorised over output positions, for thin outputs");
  m.def("isa", &isa, "The ISA this build targets: lanes, registers, block widths and row chunks of its kernels");
}
