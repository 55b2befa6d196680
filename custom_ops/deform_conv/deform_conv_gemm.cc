// Blocked, packed, multi-threaded SGEMM with an AVX2/FMA micro-kernel chosen at run time.
//
// Why not Eigen's tensor contraction (what TensorFlow's own CPU MatMul falls back to): a custom op
// is compiled with TensorFlow's portable flags (baseline x86-64, no -mavx2), so Eigen picks its
// 128-bit SSE kernels here; measured on the 3800 x 2304 x 256 product of the deformable-conv
// benchmark it was 2-3x slower than this file's AVX2 kernel. Target attributes on the micro-kernel
// (not a global -mavx2) keep the library loadable on any x86-64, which uses the portable kernel.
//
// Layout follows the usual GotoBLAS/BLIS scheme: for each depth block of kKc, op(b) is packed into
// kNr-wide column panels; threads take kMc-row blocks of op(a), pack them into kMr-tall row panels
// and run the kMr x kNr micro-kernel over every (row panel, column panel) pair.
#include "deform_conv/deform_conv_gemm.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define KD_HAVE_X86 1
#else
#define KD_HAVE_X86 0
#endif

namespace kerasdet {
namespace deform_conv {
namespace {

// Micro-tiles: AVX-512 12 x 32 (24 zmm accumulators), AVX2 and portable 6 x 16 (12 ymm).
constexpr int64_t kKc = 512;  // depth block: a kMr x kKc + kKc x kNr pair stays in L1/L2
constexpr int64_t kMc = 96;   // rows per work unit (multiple of every kMr)

// op(a)[i, p] and op(b)[p, j] readers for the packing routines.
struct View {
  const float* data;
  int64_t ld;
  bool trans;
  float at(int64_t row, int64_t col) const {
    return trans ? data[col * ld + row] : data[row * ld + col];
  }
};

// Rows [i0, i0 + mc) x depth [p0, p0 + kc) of op(a) into kMr-row panels, zero-padded, each panel
// laid out depth-major (kMr consecutive values per depth step).
template <int kMr>
void PackA(const View& a, int64_t i0, int64_t mc, int64_t p0, int64_t kc, float* out) {
  for (int64_t ir = 0; ir < mc; ir += kMr) {
    const int rows = static_cast<int>(std::min<int64_t>(kMr, mc - ir));
    if (!a.trans) {
      // Row-major a: walk each row contiguously (writes stay inside this L1-sized panel).
      for (int r = 0; r < kMr; ++r) {
        if (r < rows) {
          const float* src = a.data + (i0 + ir + r) * a.ld + p0;
          for (int64_t p = 0; p < kc; ++p) out[p * kMr + r] = src[p];
        } else {
          for (int64_t p = 0; p < kc; ++p) out[p * kMr + r] = 0.f;
        }
      }
      out += kc * kMr;
      continue;
    }
    for (int64_t p = 0; p < kc; ++p) {
      int r = 0;
      for (; r < rows; ++r) out[r] = a.at(i0 + ir + r, p0 + p);
      for (; r < kMr; ++r) out[r] = 0.f;
      out += kMr;
    }
  }
}

// Depth [p0, p0 + kc) x all n columns of op(b) into kNr-column panels, zero-padded.
template <int kNr>
void PackB(const View& b, int64_t p0, int64_t kc, int64_t n, float* out) {
  for (int64_t jr = 0; jr < n; jr += kNr) {
    const int cols = static_cast<int>(std::min<int64_t>(kNr, n - jr));
    for (int64_t p = 0; p < kc; ++p) {
      int j = 0;
      if (!b.trans && cols == kNr) {
        std::memcpy(out, b.data + (p0 + p) * b.ld + jr, sizeof(float) * kNr);
        j = kNr;
      }
      for (; j < cols; ++j) out[j] = b.at(p0 + p, jr + j);
      for (; j < kNr; ++j) out[j] = 0.f;
      out += kNr;
    }
  }
}

// tile[6 x 16] = packed a panel x packed b panel (portable; the compiler vectorizes the j loop).
constexpr int kYmmMr = 6, kYmmNr = 16;

void MicroKernelPortable(int64_t kc, const float* a, const float* b, float* out, int64_t ldo,
                         bool add) {
  float acc[kYmmMr][kYmmNr] = {};
  for (int64_t p = 0; p < kc; ++p, a += kYmmMr, b += kYmmNr) {
    for (int r = 0; r < kYmmMr; ++r) {
      const float ar = a[r];
      for (int j = 0; j < kYmmNr; ++j) acc[r][j] += ar * b[j];
    }
  }
  for (int r = 0; r < kYmmMr; ++r) {
    float* dst = out + r * ldo;
    for (int j = 0; j < kYmmNr; ++j) dst[j] = add ? dst[j] + acc[r][j] : acc[r][j];
  }
}

#if KD_HAVE_X86
__attribute__((target("avx2,fma"))) void MicroKernelAvx2(int64_t kc, const float* a,
                                                         const float* b, float* out, int64_t ldo,
                                                         bool add) {
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
  __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
  __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
  __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
  __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
  __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  for (int64_t p = 0; p < kc; ++p, a += kYmmMr, b += kYmmNr) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    __m256 ar = _mm256_broadcast_ss(a + 0);
    c00 = _mm256_fmadd_ps(ar, b0, c00); c01 = _mm256_fmadd_ps(ar, b1, c01);
    ar = _mm256_broadcast_ss(a + 1);
    c10 = _mm256_fmadd_ps(ar, b0, c10); c11 = _mm256_fmadd_ps(ar, b1, c11);
    ar = _mm256_broadcast_ss(a + 2);
    c20 = _mm256_fmadd_ps(ar, b0, c20); c21 = _mm256_fmadd_ps(ar, b1, c21);
    ar = _mm256_broadcast_ss(a + 3);
    c30 = _mm256_fmadd_ps(ar, b0, c30); c31 = _mm256_fmadd_ps(ar, b1, c31);
    ar = _mm256_broadcast_ss(a + 4);
    c40 = _mm256_fmadd_ps(ar, b0, c40); c41 = _mm256_fmadd_ps(ar, b1, c41);
    ar = _mm256_broadcast_ss(a + 5);
    c50 = _mm256_fmadd_ps(ar, b0, c50); c51 = _mm256_fmadd_ps(ar, b1, c51);
  }
#define KD_STORE8(r, col, v)                                                         \
  {                                                                                  \
    float* dst = out + (r) * ldo + (col);                                            \
    _mm256_storeu_ps(dst, add ? _mm256_add_ps(_mm256_loadu_ps(dst), v) : v);         \
  }
  KD_STORE8(0, 0, c00) KD_STORE8(0, 8, c01) KD_STORE8(1, 0, c10) KD_STORE8(1, 8, c11)
  KD_STORE8(2, 0, c20) KD_STORE8(2, 8, c21) KD_STORE8(3, 0, c30) KD_STORE8(3, 8, c31)
  KD_STORE8(4, 0, c40) KD_STORE8(4, 8, c41) KD_STORE8(5, 0, c50) KD_STORE8(5, 8, c51)
#undef KD_STORE8
}

#define KD_ROW(r)                                                       \
  ar = _mm512_set1_ps(a[r]);                                           \
  c##r##0 = _mm512_fmadd_ps(ar, b0, c##r##0);                          \
  c##r##1 = _mm512_fmadd_ps(ar, b1, c##r##1);
#define KD_DECL(r) __m512 c##r##0 = _mm512_setzero_ps(), c##r##1 = _mm512_setzero_ps();
#define KD_STORE(r)                                                                 \
  {                                                                                 \
    float* dst = out + (r) * ldo;                                                   \
    _mm512_storeu_ps(dst, add ? _mm512_add_ps(_mm512_loadu_ps(dst), c##r##0) : c##r##0);       \
    _mm512_storeu_ps(dst + 16,                                                      \
                     add ? _mm512_add_ps(_mm512_loadu_ps(dst + 16), c##r##1) : c##r##1);       \
  }

// 12 x 32 tile: 24 accumulators + 2 b registers + 1 broadcast of the 32 zmm registers.
__attribute__((target("avx512f"))) void MicroKernelAvx512(int64_t kc, const float* a,
                                                         const float* b, float* out, int64_t ldo,
                                                         bool add) {
  KD_DECL(0) KD_DECL(1) KD_DECL(2) KD_DECL(3) KD_DECL(4) KD_DECL(5)
  KD_DECL(6) KD_DECL(7) KD_DECL(8) KD_DECL(9) KD_DECL(10) KD_DECL(11)
  for (int64_t p = 0; p < kc; ++p, a += 12, b += 32) {
    const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
    __m512 ar;
    KD_ROW(0) KD_ROW(1) KD_ROW(2) KD_ROW(3) KD_ROW(4) KD_ROW(5)
    KD_ROW(6) KD_ROW(7) KD_ROW(8) KD_ROW(9) KD_ROW(10) KD_ROW(11)
  }
  KD_STORE(0) KD_STORE(1) KD_STORE(2) KD_STORE(3) KD_STORE(4) KD_STORE(5)
  KD_STORE(6) KD_STORE(7) KD_STORE(8) KD_STORE(9) KD_STORE(10) KD_STORE(11)
}
#undef KD_ROW
#undef KD_DECL
#undef KD_STORE

bool CpuHasAvx512() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

bool CpuHasAvx2Fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

// kernel(kc, packed a, packed b, out, ldo, add): out[kMr x kNr] (+)= a x b, rows ldo apart.
using MicroKernel = void (*)(int64_t, const float*, const float*, float*, int64_t, bool);

template <int kMr, int kNr>
void BlockedSgemm(MicroKernel kernel, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                  const float* a, const float* b, float* c, bool accumulate,
                  const ParallelFor& parallel_for) {
  static_assert(kMc % kMr == 0, "kMc must be a multiple of the micro-tile height");
  const View va{a, trans_a ? m : k, trans_a};
  const View vb{b, trans_b ? k : n, trans_b};
  const int64_t n_panels = (n + kNr - 1) / kNr;
  std::vector<float> packed_b(static_cast<size_t>(std::min(k, kKc) * n_panels * kNr));
  const int64_t m_blocks = (m + kMc - 1) / kMc;

  for (int64_t p0 = 0; p0 < k; p0 += kKc) {
    const int64_t kc = std::min(kKc, k - p0);
    PackB<kNr>(vb, p0, kc, n, packed_b.data());
    const bool add = accumulate || p0 > 0;
    parallel_for(m_blocks, 2 * kMc * kc * n, [&](int64_t begin, int64_t end) {
      std::vector<float> packed_a(static_cast<size_t>(kMc * kc));
      float tile[kMr * kNr];
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t i0 = blk * kMc, mc = std::min(kMc, m - i0);
        PackA<kMr>(va, i0, mc, p0, kc, packed_a.data());
        for (int64_t jp = 0; jp < n_panels; ++jp) {
          const int64_t j0 = jp * kNr;
          const int cols = static_cast<int>(std::min<int64_t>(kNr, n - j0));
          const float* bp = packed_b.data() + jp * kc * kNr;
          for (int64_t ir = 0; ir < mc; ir += kMr) {
            const int rows = static_cast<int>(std::min<int64_t>(kMr, mc - ir));
            float* dst = c + (i0 + ir) * n + j0;
            if (rows == kMr && cols == kNr) {  // full tile: straight into c
              kernel(kc, packed_a.data() + ir * kc, bp, dst, n, add);
              continue;
            }
            kernel(kc, packed_a.data() + ir * kc, bp, tile, kNr, false);
            for (int r = 0; r < rows; ++r) {
              for (int j = 0; j < cols; ++j) {
                dst[r * n + j] = add ? dst[r * n + j] + tile[r * kNr + j] : tile[r * kNr + j];
              }
            }
          }
        }
      }
    });
  }
}

// 2 = AVX-512, 1 = AVX2 + FMA, 0 = portable: the best the CPU has, lowered (never raised) by
// KERASDET_CPU_GEMM=avx2|portable so the tests can cover every kernel on one machine.
int MicroKernelLevel() {
  static const int level = [] {
    int best = 0;
#if KD_HAVE_X86
    best = CpuHasAvx512() ? 2 : CpuHasAvx2Fma() ? 1 : 0;
#endif
    const char* env = std::getenv("KERASDET_CPU_GEMM");
    const std::string want = env ? env : "";
    if (want == "portable") return 0;
    if (want == "avx2") return std::min(best, 1);
    return best;
  }();
  return level;
}

}  // namespace

void Sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a,
           const float* b, float* c, bool accumulate, const ParallelFor& parallel_for) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    if (!accumulate) std::fill(c, c + m * n, 0.f);
    return;
  }
#if KD_HAVE_X86
  const int level = MicroKernelLevel();
  if (level == 2) {
    BlockedSgemm<12, 32>(MicroKernelAvx512, trans_a, trans_b, m, n, k, a, b, c, accumulate,
                         parallel_for);
    return;
  }
  if (level == 1) {
    BlockedSgemm<6, 16>(MicroKernelAvx2, trans_a, trans_b, m, n, k, a, b, c, accumulate,
                        parallel_for);
    return;
  }
#endif
  BlockedSgemm<6, 16>(MicroKernelPortable, trans_a, trans_b, m, n, k, a, b, c, accumulate,
                      parallel_for);
}

}  // namespace deform_conv
}  // namespace kerasdet
