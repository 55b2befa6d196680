// CPU kernels of the Winograd F(m x m, 3 x 3) tile transforms (registrations in winograd_ops.cc).
//
// All four ops are one of two loops with a different small matrix L:
//   * Gather: for every tile, out[a, b] = sum_ij L[a, i] w[i, j] L[b, j] over the tile's S x S window
//     w of an NHWC tensor (zero outside it): the input transform (L = B^T, S = m + 2) and the output
//     transform's adjoint (L = A, S = m).
//   * Scatter: for every tile, w[i, j] = sum_ab L[i, a] t[a, b] L[j, b] written into (or, where the
//     windows overlap, summed into) the tile's window, cropped at the tensor's edge: the output
//     transform (L = A^T, S = m) and the input transform's adjoint (L = B, S = m + 2).
// Tiles live in [(m + 2)^2, tiles, channels]; each transform runs on a block of channels at a time
// so the innermost loops are independent lanes the compiler vectorizes. The arithmetic is float32
// whatever the tensor type (bfloat16 / half are converted on load and rounded once on store).
//
// Threading: Gather and the non-overlapping Scatter split (tile, channel block) units over the CPU
// worker pool; the overlapping Scatter (input gradient) splits (image, channel block) units, each
// owning its channels of one image, so no two workers write the same element (no atomics, and the
// result does not depend on the number of threads).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "common/cpu_parallel.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/framework/tensor.h"

namespace kerasdet {
namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::errors::InvalidArgument;

// The transform matrices of Lavin & Gray (2016) for interpolation points 0, +-1 (m = 2),
// 0, +-1, +-2 (m = 4) and 0, +-1, +-2, +-1/2 (m = 6; the Toom-Cook construction of the paper's
// section 4, the points NNPACK uses for F(6x6, 3x3) too), row-major: B^T is r x r and A^T m x r
// (r = m + 2). G (the filter transform) is applied in Python (kerasdet.ops.winograd); the tests
// check each triple against the correlation's definition.
struct F2 {
  static constexpr int m = 2, r = 4;
  static constexpr float bt[r * r] = {1, 0, -1, 0,  //
                                      0, 1, 1,  0,  //
                                      0, -1, 1, 0,  //
                                      0, 1, 0,  -1};
  static constexpr float at[m * r] = {1, 1, 1, 0,  //
                                      0, 1, -1, -1};
};
struct F4 {
  static constexpr int m = 4, r = 6;
  static constexpr float bt[r * r] = {4, 0,  -5, 0,  1, 0,  //
                                      0, -4, -4, 1,  1, 0,  //
                                      0, 4,  -4, -1, 1, 0,  //
                                      0, -2, -1, 2,  1, 0,  //
                                      0, 2,  -1, -2, 1, 0,  //
                                      0, 4,  0,  -5, 0, 1};
  static constexpr float at[m * r] = {1, 1, 1,  1, 1,  0,  //
                                      0, 1, -1, 2, -2, 0,  //
                                      0, 1, 1,  4, 4,  0,  //
                                      0, 1, -1, 8, -8, 1};
};
struct F6 {
  static constexpr int m = 6, r = 8;
  static constexpr float bt[r * r] = {1, 0,     -5.25f, 0,      5.25f,  0,      -1, 0,  //
                                      0, 1,     1,      -4.25f, -4.25f, 1,      1,  0,  //
                                      0, -1,    1,      4.25f,  -4.25f, -1,     1,  0,  //
                                      0, 0.5f,  0.25f,  -2.5f,  -1.25f, 2,      1,  0,  //
                                      0, -0.5f, 0.25f,  2.5f,   -1.25f, -2,     1,  0,  //
                                      0, 2,     4,      -2.5f,  -5,     0.5f,   1,  0,  //
                                      0, -2,    4,      2.5f,   -5,     -0.5f,  1,  0,  //
                                      0, -1,    0,      5.25f,  0,      -5.25f, 0,  1};
  static constexpr float at[m * r] = {1, 1, 1,  1,  1,   1,        1,         0,  //
                                      0, 1, -1, 2,  -2,  0.5f,     -0.5f,     0,  //
                                      0, 1, 1,  4,  4,   0.25f,    0.25f,     0,  //
                                      0, 1, -1, 8,  -8,  0.125f,   -0.125f,   0,  //
                                      0, 1, 1,  16, 16,  0.0625f,  0.0625f,   0,  //
                                      0, 1, -1, 32, -32, 0.03125f, -0.03125f, 1};
};

// The matrix L each op applies on both sides (out = L in L^T), as a compile-time operand: with the
// loops below unrolled, every entry is a constant, the zero ones vanish and a tile's lanes stay in
// registers. The first version read L from memory inside runtime-bounded loops and was
// compute-bound at ~650 ns per 16-channel tile (the same per tile whether the tensors fitted in L2
// or not), 3x the time the memory traffic needs.
// L of an op: B^T (r x r) or A^T (m x r) of F, or for the adjoints their transposes.
template <class F, bool kInput, bool kAdjoint>
struct TransformL {
  static constexpr int stored_rows = kInput ? F::r : F::m;  // both stored row-major, r columns
  static constexpr int rows = kAdjoint ? F::r : stored_rows, cols = kAdjoint ? stored_rows : F::r;
  static constexpr float at(int a, int i) {
    const float* stored = kInput ? F::bt : F::at;
    return kAdjoint ? stored[i * F::r + a] : stored[a * F::r + i];
  }
};
template <class F> using InputL = TransformL<F, true, false>;          // the input transform
template <class F> using InputAdjointL = TransformL<F, true, true>;    // its adjoint
template <class F> using OutputL = TransformL<F, false, false>;        // the output transform
template <class F> using OutputAdjointL = TransformL<F, false, true>;  // its adjoint

constexpr int kMaxSide = 8;
constexpr int kBlock = 16;  // channels per unit: one AVX-512 register of float32

// The tile grid laid over an NHWC tensor [n, h, w, c]: tile (ty, tx) of image b has its window's
// top-left corner at (off_y + ty * stride, off_x + tx * stride) and side `window`; its transformed
// values are the r x r tile at row (b * tiles_h + ty) * tiles_w + tx of [r * r, tiles, c].
struct TileGrid {
  int64_t n, h, w, c;
  int64_t tiles_h, tiles_w;
  int stride, off_y, off_x, window, r;

  int64_t tiles() const { return n * tiles_h * tiles_w; }
  int64_t blocks() const { return (c + kBlock - 1) / kBlock; }
};

using Block = float[kMaxSide][kMaxSide][kBlock];

// out[a][b] = sum_ij L(a, i) in[i][j] L(b, j) for L of L::rows x L::cols, lane by lane.
template <class L>
__attribute__((always_inline)) inline void Sandwich(const Block& in, Block& out) {
  float half[L::rows][L::cols][kBlock];  // (L in)[a][j]
#pragma GCC unroll 8
  for (int a = 0; a < L::rows; ++a) {
#pragma GCC unroll 8
    for (int j = 0; j < L::cols; ++j) {
      float h[kBlock] = {};
#pragma GCC unroll 8
      for (int i = 0; i < L::cols; ++i) {
        const float l = L::at(a, i);
        if (l == 0.f) continue;
        for (int k = 0; k < kBlock; ++k) h[k] += l * in[i][j][k];
      }
      for (int k = 0; k < kBlock; ++k) half[a][j][k] = h[k];
    }
  }
#pragma GCC unroll 8
  for (int a = 0; a < L::rows; ++a) {
#pragma GCC unroll 8
    for (int b = 0; b < L::rows; ++b) {
      float o[kBlock] = {};
#pragma GCC unroll 8
      for (int j = 0; j < L::cols; ++j) {
        const float l = L::at(b, j);
        if (l == 0.f) continue;
        for (int k = 0; k < kBlock; ++k) o[k] += half[a][j][k] * l;
      }
      for (int k = 0; k < kBlock; ++k) out[a][b][k] = o[k];
    }
  }
}

template <typename T>
__attribute__((always_inline)) inline void LoadBlock(const T* src, int nc, float* dst) {
  if (nc == kBlock) {  // the common case, a fixed-length loop the compiler turns into one vector load
    for (int k = 0; k < kBlock; ++k) dst[k] = static_cast<float>(src[k]);
    return;
  }
  int k = 0;
  for (; k < nc; ++k) dst[k] = static_cast<float>(src[k]);
  for (; k < kBlock; ++k) dst[k] = 0.f;
}

template <typename T>
__attribute__((always_inline)) inline void StoreBlock(const float* src, int nc, T* dst) {
  if (nc == kBlock) {
    for (int k = 0; k < kBlock; ++k) dst[k] = static_cast<T>(src[k]);
    return;
  }
  for (int k = 0; k < nc; ++k) dst[k] = static_cast<T>(src[k]);
}

// Requests the cache lines of tile p's channel block c0 in the [r * r, P, c] tiles tensor ahead of
// their use: a tile's values lie in r * r = 16 to 64 streams P * c apart, more than the hardware
// prefetchers follow. kPrefetchUnits ahead of the unit being transformed.
constexpr int64_t kPrefetchUnits = 2;

template <bool kWrite, typename T>
__attribute__((always_inline)) inline void PrefetchTile(const TileGrid& g, const T* t, int64_t p, int64_t c0) {
  const int64_t P = g.tiles();
  if (p >= P) return;
  for (int ab = 0; ab < g.r * g.r; ++ab) {
    __builtin_prefetch(t + (static_cast<int64_t>(ab) * P + p) * g.c + c0, kWrite ? 1 : 0, 3);
  }
}

template <typename T, class L>
__attribute__((always_inline)) inline void Gather(const TileGrid& g, const T* x, T* out, int64_t begin, int64_t end) {
  constexpr int S = L::cols, R = L::rows;
  const int64_t P = g.tiles();
  Block win, tile;
  for (int64_t unit = begin; unit < end; ++unit) {
    const int64_t p = unit / g.blocks();
    const int64_t c0 = (unit % g.blocks()) * kBlock;
    const int nc = static_cast<int>(std::min<int64_t>(kBlock, g.c - c0));
    const int64_t ahead = unit + kPrefetchUnits;
    PrefetchTile<true>(g, out, ahead / g.blocks(), (ahead % g.blocks()) * kBlock);
    const int64_t b = p / (g.tiles_h * g.tiles_w);
    const int64_t ty = (p / g.tiles_w) % g.tiles_h, tx = p % g.tiles_w;
    const int64_t y0 = g.off_y + ty * g.stride, x0 = g.off_x + tx * g.stride;
    for (int i = 0; i < S; ++i) {
      const int64_t y = y0 + i;
      for (int j = 0; j < S; ++j) {
        const int64_t xx = x0 + j;
        if (y < 0 || y >= g.h || xx < 0 || xx >= g.w) {
          std::fill(win[i][j], win[i][j] + kBlock, 0.f);
        } else {
          LoadBlock(x + ((b * g.h + y) * g.w + xx) * g.c + c0, nc, win[i][j]);
        }
      }
    }
    Sandwich<L>(win, tile);
    for (int a = 0; a < R; ++a) {
      for (int bb = 0; bb < R; ++bb) {
        StoreBlock(tile[a][bb], nc, out + (static_cast<int64_t>(a * R + bb) * P + p) * g.c + c0);
      }
    }
  }
}

// One tile's window values for the channel block: w[i][j] = sum_ab L(i, a) t[a, b] L(j, b).
template <typename T, class L>
__attribute__((always_inline)) inline void TileWindow(const TileGrid& g, const T* t, int64_t p, int64_t c0, int nc, Block& w) {
  constexpr int R = L::cols;
  const int64_t P = g.tiles();
  Block tile;
  for (int a = 0; a < R; ++a) {
    for (int bb = 0; bb < R; ++bb) {
      LoadBlock(t + (static_cast<int64_t>(a * R + bb) * P + p) * g.c + c0, nc, tile[a][bb]);
    }
  }
  Sandwich<L>(tile, w);
}

// Non-overlapping windows (stride == window): every output element is written by one tile, after
// adding bias[channel] (if given) and, with relu, clamping at 0: the layer's epilogue in the same pass.
template <typename T, class L>
__attribute__((always_inline)) inline void ScatterAssign(const TileGrid& g, const T* t, const T* bias, bool relu, T* y,
                                                         int64_t begin, int64_t end) {
  Block w;
  float shift[kBlock];
  for (int64_t unit = begin; unit < end; ++unit) {
    const int64_t p = unit / g.blocks();
    const int64_t c0 = (unit % g.blocks()) * kBlock;
    const int nc = static_cast<int>(std::min<int64_t>(kBlock, g.c - c0));
    const int64_t ahead = unit + kPrefetchUnits;
    PrefetchTile<false>(g, t, ahead / g.blocks(), (ahead % g.blocks()) * kBlock);
    TileWindow<T, L>(g, t, p, c0, nc, w);
    if (bias != nullptr) {
      LoadBlock(bias + c0, nc, shift);
    } else {
      std::fill(shift, shift + kBlock, 0.f);
    }
    const float floor = relu ? 0.f : -std::numeric_limits<float>::infinity();
    const int64_t b = p / (g.tiles_h * g.tiles_w);
    const int64_t ty = (p / g.tiles_w) % g.tiles_h, tx = p % g.tiles_w;
    const int64_t y0 = g.off_y + ty * g.stride, x0 = g.off_x + tx * g.stride;
    for (int i = 0; i < L::rows; ++i) {
      const int64_t yy = y0 + i;
      if (yy < 0 || yy >= g.h) continue;
      for (int j = 0; j < L::rows; ++j) {
        const int64_t xx = x0 + j;
        if (xx < 0 || xx >= g.w) continue;
        float* v = w[i][j];
        for (int k = 0; k < kBlock; ++k) v[k] = std::max(v[k] + shift[k], floor);
        StoreBlock(v, nc, y + ((b * g.h + yy) * g.w + xx) * g.c + c0);
      }
    }
  }
}

// Overlapping windows (the input transform's adjoint, window S = m + 2 at stride m): units are
// (image, channel block). Each tile owns the top-left m x m of its window (the whole window on the
// last row / column of tiles) and writes it once; the two columns it shares with the next tile of
// its row travel in `side`, the two rows it shares with the next row of tiles in `next` (float32,
// [2, window columns, kBlock]: ~40 KB at P2, cache-resident). An earlier version summed whole
// images into an [h, w, kBlock] buffer (~4 MB at P2) and copied it out: 2.5x the time.
template <typename T, class L>
__attribute__((always_inline)) inline void ScatterAdd(const TileGrid& g, const T* t, T* y, int64_t begin, int64_t end) {
  constexpr int S = L::rows, M = S - 2;
  const int64_t span = g.tiles_w * M + 2;
  std::vector<float> carry(static_cast<size_t>(2 * span * kBlock)), next(carry.size());
  Block w;
  float side[kMaxSide][2][kBlock];
  for (int64_t unit = begin; unit < end; ++unit) {
    const int64_t b = unit / g.blocks();
    const int64_t c0 = (unit % g.blocks()) * kBlock;
    const int nc = static_cast<int>(std::min<int64_t>(kBlock, g.c - c0));
    for (int64_t ty = 0; ty < g.tiles_h; ++ty) {
      const bool last_row = ty == g.tiles_h - 1;
      const int rows_own = last_row ? S : M;
      if (!last_row) std::fill(next.begin(), next.end(), 0.f);
      for (int64_t tx = 0; tx < g.tiles_w; ++tx) {
        const bool last_col = tx == g.tiles_w - 1;
        const int cols_own = last_col ? S : M;
        const int64_t p = (b * g.tiles_h + ty) * g.tiles_w + tx;
        PrefetchTile<false>(g, t, p + kPrefetchUnits, c0);
        TileWindow<T, L>(g, t, p, c0, nc, w);
        if (tx > 0) {  // the left tile's last two columns
          for (int i = 0; i < rows_own; ++i) {
            for (int jj = 0; jj < 2; ++jj) {
              for (int k = 0; k < kBlock; ++k) w[i][jj][k] += side[i][jj][k];
            }
          }
        }
        if (ty > 0) {  // the last two rows of the row of tiles above, over this tile's own columns
          for (int ii = 0; ii < 2; ++ii) {
            const float* above = carry.data() + (ii * span + tx * M) * kBlock;
            for (int j = 0; j < cols_own; ++j) {
              for (int k = 0; k < kBlock; ++k) w[ii][j][k] += above[j * kBlock + k];
            }
          }
        }
        if (!last_col) {
          for (int i = 0; i < rows_own; ++i) {
            for (int jj = 0; jj < 2; ++jj) {
              for (int k = 0; k < kBlock; ++k) side[i][jj][k] = w[i][M + jj][k];
            }
          }
        }
        if (!last_row) {
          for (int ii = 0; ii < 2; ++ii) {
            float* below = next.data() + (ii * span + tx * M) * kBlock;
            for (int j = 0; j < S; ++j) {
              for (int k = 0; k < kBlock; ++k) below[j * kBlock + k] += w[M + ii][j][k];
            }
          }
        }
        const int64_t y0 = g.off_y + ty * g.stride, x0 = g.off_x + tx * g.stride;
        for (int i = 0; i < rows_own; ++i) {
          const int64_t yy = y0 + i;
          if (yy < 0 || yy >= g.h) continue;
          for (int j = 0; j < cols_own; ++j) {
            const int64_t xx = x0 + j;
            if (xx < 0 || xx >= g.w) continue;
            StoreBlock(w[i][j], nc, y + ((b * g.h + yy) * g.w + xx) * g.c + c0);
          }
        }
      }
      carry.swap(next);
    }
  }
}

// Entry points per tensor type, each compiled once per instruction set (GCC clones only
// non-template functions; the always-inline templates above are expanded into every clone), each
// dispatching on the tile size m (g.r = m + 2).
#define KD_WINOGRAD_ENTRY_POINTS(T)                                                                 \
  KD_CPU_CLONES void InputTransformRange(const TileGrid& g, const T* x, T* out, int64_t b,         \
                                         int64_t e) {                                              \
    if (g.r == 4) Gather<T, InputL<F2>>(g, x, out, b, e);                                          \
    else if (g.r == 6) Gather<T, InputL<F4>>(g, x, out, b, e);                                     \
    else Gather<T, InputL<F6>>(g, x, out, b, e);                                                   \
  }                                                                                                 \
  KD_CPU_CLONES void OutputTransformGradRange(const TileGrid& g, const T* x, T* out, int64_t b,    \
                                              int64_t e) {                                         \
    if (g.r == 4) Gather<T, OutputAdjointL<F2>>(g, x, out, b, e);                                  \
    else if (g.r == 6) Gather<T, OutputAdjointL<F4>>(g, x, out, b, e);                             \
    else Gather<T, OutputAdjointL<F6>>(g, x, out, b, e);                                           \
  }                                                                                                 \
  KD_CPU_CLONES void OutputTransformRange(const TileGrid& g, const T* t, const T* bias, bool relu, \
                                          T* y, int64_t b, int64_t e) {                            \
    if (g.r == 4) ScatterAssign<T, OutputL<F2>>(g, t, bias, relu, y, b, e);                        \
    else if (g.r == 6) ScatterAssign<T, OutputL<F4>>(g, t, bias, relu, y, b, e);                   \
    else ScatterAssign<T, OutputL<F6>>(g, t, bias, relu, y, b, e);                                 \
  }                                                                                                 \
  KD_CPU_CLONES void InputTransformGradRange(const TileGrid& g, const T* t, T* y, int64_t b,       \
                                             int64_t e) {                                          \
    if (g.r == 4) ScatterAdd<T, InputAdjointL<F2>>(g, t, y, b, e);                                 \
    else if (g.r == 6) ScatterAdd<T, InputAdjointL<F4>>(g, t, y, b, e);                            \
    else ScatterAdd<T, InputAdjointL<F6>>(g, t, y, b, e);                                          \
  }

KD_WINOGRAD_ENTRY_POINTS(float)
KD_WINOGRAD_ENTRY_POINTS(Eigen::bfloat16)
KD_WINOGRAD_ENTRY_POINTS(Eigen::half)
#undef KD_WINOGRAD_ENTRY_POINTS

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Reads an int32 shape vector of `rank` non-negative entries (the size inputs of the ops).
bool ReadSizes(OpKernelContext* ctx, const Tensor& t, int rank, const char* what, int64_t* out) {
  if (t.dims() != 1 || t.NumElements() != rank) {
    ctx->CtxFailure(__FILE__, __LINE__, InvalidArgument(what, " must be a vector of ", rank,
                                                        " int32, got shape ", t.shape().DebugString()));
    return false;
  }
  auto v = t.flat<int32_t>();
  for (int k = 0; k < rank; ++k) {
    if (v(k) < 0) {
      ctx->CtxFailure(__FILE__, __LINE__, InvalidArgument(what, " has a negative entry: ", v(k)));
      return false;
    }
    out[k] = v(k);
  }
  return true;
}

class WinogradBase : public OpKernel {
 public:
  explicit WinogradBase(OpKernelConstruction* ctx, bool padded) : OpKernel(ctx), pads_{0, 0, 0, 0} {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("tile", &m_));
    OP_REQUIRES(ctx, m_ == 2 || m_ == 4 || m_ == 6,
                InvalidArgument("tile must be 2, 4 or 6 (F(2x2, 3x3), F(4x4, 3x3), F(6x6, 3x3)), got ", m_));
    if (padded) {
      OP_REQUIRES_OK(ctx, ctx->GetAttr("pad_top", &pads_[0]));
      OP_REQUIRES_OK(ctx, ctx->GetAttr("pad_bottom", &pads_[1]));
      OP_REQUIRES_OK(ctx, ctx->GetAttr("pad_left", &pads_[2]));
      OP_REQUIRES_OK(ctx, ctx->GetAttr("pad_right", &pads_[3]));
    }
  }

 protected:
  // The grid of the input transform over the input [n, h, w, c] (or its adjoint), or sets an error.
  bool InputGrid(OpKernelContext* ctx, int64_t n, int64_t h, int64_t w, int64_t c, TileGrid* g) {
    const int64_t oh = h + pads_[0] + pads_[1] - 2, ow = w + pads_[2] + pads_[3] - 2;
    if (oh < 1 || ow < 1) {
      ctx->CtxFailure(__FILE__, __LINE__,
                      InvalidArgument("a 3x3 convolution of a ", h, " x ", w, " input padded by (",
                                      pads_[0], ", ", pads_[1], ") x (", pads_[2], ", ", pads_[3],
                                      ") has no output"));
      return false;
    }
    *g = TileGrid{n, h, w, c, CeilDiv(oh, m_), CeilDiv(ow, m_), m_, -pads_[0], -pads_[2], m_ + 2,
                  m_ + 2};
    return true;
  }

  // The grid of the output transform over the output [n, oh, ow, k] (or its adjoint).
  TileGrid OutputGrid(int64_t n, int64_t oh, int64_t ow, int64_t k) const {
    return TileGrid{n, oh, ow, k, CeilDiv(oh, m_), CeilDiv(ow, m_), m_, 0, 0, m_, m_ + 2};
  }

  // Checks that tiles [(m + 2)^2, P, C] has the P of grid g.
  bool CheckTiles(OpKernelContext* ctx, const Tensor& t, const TileGrid& g, const char* what) {
    const int64_t r2 = static_cast<int64_t>(m_ + 2) * (m_ + 2);
    if (t.dims() != 3 || t.dim_size(0) != r2 || t.dim_size(1) != g.tiles()) {
      ctx->CtxFailure(__FILE__, __LINE__,
                      InvalidArgument(what, " must be [", r2, ", ", g.tiles(), ", channels] for ",
                                      g.n, " images of ", g.tiles_h, " x ", g.tiles_w,
                                      " tiles, got shape ", t.shape().DebugString()));
      return false;
    }
    return true;
  }

  // The gather ops (the input transform, the output transform's adjoint): tiles [r^2, P, c] of
  // `in` over grid g, by `range` (InputTransformRange or OutputTransformGradRange).
  template <typename T>
  void GatherTiles(OpKernelContext* ctx, const TileGrid& g, const Tensor& in,
                   void (*range)(const TileGrid&, const T*, T*, int64_t, int64_t)) {
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({g.r * g.r, g.tiles(), g.c}), &out));
    if (out->NumElements() == 0) return;
    const T* src = in.flat<T>().data();
    T* dst = out->flat<T>().data();
    ShardOnCpu(ctx, g.tiles() * g.blocks(), 40 * kBlock * g.r * g.r,
               [&](int64_t b, int64_t e) { range(g, src, dst, b, e); });
  }

  int m_;
  int pads_[4];
};

template <typename T>
class InputTransformOp : public WinogradBase {
 public:
  explicit InputTransformOp(OpKernelConstruction* ctx) : WinogradBase(ctx, true) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    OP_REQUIRES(ctx, x.dims() == 4,
                InvalidArgument("input must be NHWC [N, H, W, C], got shape ", x.shape().DebugString()));
    TileGrid g;
    if (!InputGrid(ctx, x.dim_size(0), x.dim_size(1), x.dim_size(2), x.dim_size(3), &g)) return;
    GatherTiles<T>(ctx, g, x, InputTransformRange);
  }
};

template <typename T>
class InputTransformGradOp : public WinogradBase {
 public:
  explicit InputTransformGradOp(OpKernelConstruction* ctx) : WinogradBase(ctx, true) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& grad = ctx->input(0);
    int64_t s[4];
    if (!ReadSizes(ctx, ctx->input(1), 4, "input_shape", s)) return;
    TileGrid g;
    if (!InputGrid(ctx, s[0], s[1], s[2], s[3], &g)) return;
    if (!CheckTiles(ctx, grad, g, "grad")) return;
    OP_REQUIRES(ctx, grad.dim_size(2) == s[3],
                InvalidArgument("grad has ", grad.dim_size(2), " channels, input_shape ", s[3]));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({s[0], s[1], s[2], s[3]}), &out));
    if (out->NumElements() == 0) return;
    const T* src = grad.flat<T>().data();
    T* dst = out->flat<T>().data();
    ShardOnCpu(ctx, g.n * g.blocks(), 40 * kBlock * g.r * g.r * g.tiles_h * g.tiles_w,
        [&](int64_t b, int64_t e) { InputTransformGradRange(g, src, dst, b, e); });
  }
};

template <typename T>
class OutputTransformOp : public WinogradBase {
 public:
  explicit OutputTransformOp(OpKernelConstruction* ctx) : WinogradBase(ctx, false) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("relu", &relu_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& t = ctx->input(0);
    int64_t s[3];
    if (!ReadSizes(ctx, ctx->input(1), 3, "output_size", s)) return;
    OP_REQUIRES(ctx, t.dims() == 3,
                InvalidArgument("input must be tiles [(tile + 2)^2, P, K], got shape ",
                                t.shape().DebugString()));
    const TileGrid g = OutputGrid(s[0], s[1], s[2], t.dim_size(2));
    if (!CheckTiles(ctx, t, g, "input")) return;
    const Tensor& bias = ctx->input(2);
    OP_REQUIRES(ctx, bias.dims() == 1 && (bias.dim_size(0) == 0 || bias.dim_size(0) == g.c),
                InvalidArgument("bias must be [", g.c, "] (one per output channel) or [0] (none), got "
                                "shape ", bias.shape().DebugString()));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({s[0], s[1], s[2], g.c}), &out));
    if (out->NumElements() == 0) return;
    const T* src = t.flat<T>().data();
    T* dst = out->flat<T>().data();
    const T* shift = bias.dim_size(0) > 0 ? bias.flat<T>().data() : nullptr;
    ShardOnCpu(ctx, g.tiles() * g.blocks(), 40 * kBlock * g.r * g.r,
        [&](int64_t b, int64_t e) { OutputTransformRange(g, src, shift, relu_, dst, b, e); });
  }

 private:
  bool relu_;
};

template <typename T>
class OutputTransformGradOp : public WinogradBase {
 public:
  explicit OutputTransformGradOp(OpKernelConstruction* ctx) : WinogradBase(ctx, false) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& grad = ctx->input(0);
    OP_REQUIRES(ctx, grad.dims() == 4,
                InvalidArgument("grad must be NHWC [N, OH, OW, K], got shape ",
                                grad.shape().DebugString()));
    const TileGrid g = OutputGrid(grad.dim_size(0), grad.dim_size(1), grad.dim_size(2), grad.dim_size(3));
    GatherTiles<T>(ctx, g, grad, OutputTransformGradRange);
  }
};

using tensorflow::DEVICE_CPU;
#define KD_REGISTER_WINOGRAD(T)                                                                   \
  REGISTER_KERNEL_BUILDER(                                                                        \
      Name("KerasDet>WinogradInputTransform").Device(DEVICE_CPU).TypeConstraint<T>("T"),          \
      InputTransformOp<T>);                                                                       \
  REGISTER_KERNEL_BUILDER(                                                                        \
      Name("KerasDet>WinogradInputTransformGrad").Device(DEVICE_CPU).TypeConstraint<T>("T"),      \
      InputTransformGradOp<T>);                                                                   \
  REGISTER_KERNEL_BUILDER(                                                                        \
      Name("KerasDet>WinogradOutputTransform").Device(DEVICE_CPU).TypeConstraint<T>("T"),         \
      OutputTransformOp<T>);                                                                      \
  REGISTER_KERNEL_BUILDER(                                                                        \
      Name("KerasDet>WinogradOutputTransformGrad").Device(DEVICE_CPU).TypeConstraint<T>("T"),     \
      OutputTransformGradOp<T>);

KD_REGISTER_WINOGRAD(float)
KD_REGISTER_WINOGRAD(Eigen::bfloat16)
KD_REGISTER_WINOGRAD(Eigen::half)
#undef KD_REGISTER_WINOGRAD

}  // namespace
}  // namespace kerasdet
