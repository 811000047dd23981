// Patch tiler: multi-scale grid boxes, and every patch cropped, resized to the backbone's input size and
// normalised straight into one NCHW float32/float16 batch.
//
// The resize reproduces Pillow's `Image.crop(box).resize((s, s), BILINEAR | BICUBIC)` bit for bit (Pillow's
// libImaging/Resample.c, 8-bit path): separable filter with its support scaled by the downscale factor
// (antialiasing), double-precision coefficients rounded to 22-bit fixed point, the first pass over only the
// rows/columns the second pass reads, uint8 rounding/clipping between the passes, and Pillow 13's choice of which
// pass runs first (see pillow_vertical_first). Matching Pillow exactly means the index built here and a query
// prepared by any Pillow-based pipeline see the same pixels.
//
// Speed comes from layout, not from a different algorithm: both passes are turned into "weighted sum of
// contiguous rows" (the horizontal pass on a 16-row transposed block), vectorised; the hot kernel has an AVX2
// version picked at run time, so one baseline x86-64 binary still uses the wide units.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "patchify/cpu_features.h"
#include "patchify/half.h"
#include "patchify/parallel.h"

namespace patchify {

// Largest grid accepted (a 256x256 grid is 65536 patches per image: far beyond any sensible use, but keeps
// every count in 32 bits).
constexpr int kMaxGrid = 256;

enum class Interpolation { bilinear, bicubic };
enum class OutputType { float32, float16 };

inline Interpolation parse_interpolation(const std::string& name) {
  if (name == "bilinear") return Interpolation::bilinear;
  if (name == "bicubic") return Interpolation::bicubic;
  throw std::invalid_argument("interpolation must be 'bilinear' or 'bicubic', got '" + name + "'");
}

// One patch: its box (x0, y0, x1, y1; original pixels, exclusive max), the grid size g of its g x g grid and its
// cell index (row-major, r * g + c).
struct PatchBox {
  int32_t x0, y0, x1, y1;
  int32_t grid;
  int32_t cell;
};

inline void validate_grids(const std::vector<int>& grids) {
  if (grids.empty()) throw std::invalid_argument("grids must not be empty");
  for (int g : grids) {
    if (g < 1 || g > kMaxGrid)
      throw std::invalid_argument("grid sizes must be in [1, " + std::to_string(kMaxGrid) + "], got " +
                                  std::to_string(g));
  }
}

inline void validate_overlap(double overlap) {
  if (!(overlap >= 0.0 && overlap < 1.0))  // also rejects NaN
    throw std::invalid_argument("overlap must be in [0, 1), got " + std::to_string(overlap));
}

inline size_t patches_per_image(const std::vector<int>& grids) {
  size_t n = 0;
  for (int g : grids) n += static_cast<size_t>(g) * static_cast<size_t>(g);
  return n;
}

// Boxes of every patch of one height x width image, in output order: grids in the given order, each row-major.
// Cell (r, c) of a g x g grid spans [floor(c*W/g), floor((c+1)*W/g)) x [floor(r*H/g), floor((r+1)*H/g)), so the
// cells tile the image exactly. With overlap > 0 each side moves out by round(overlap * cell extent), clipped to
// the image. Throws std::invalid_argument when a cell would be empty (image smaller than the grid).
inline std::vector<PatchBox> patch_boxes(int64_t height, int64_t width, const std::vector<int>& grids,
                                         double overlap = 0.0) {
  validate_grids(grids);
  validate_overlap(overlap);
  if (height < 1 || width < 1 || height > std::numeric_limits<int32_t>::max() ||
      width > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument("image size must be between 1x1 and 2^31-1 pixels per side, got " +
                                std::to_string(height) + "x" + std::to_string(width) + " (HxW)");
  const int finest = *std::max_element(grids.begin(), grids.end());
  if (height < finest || width < finest)
    throw std::invalid_argument("image of " + std::to_string(height) + "x" + std::to_string(width) +
                                " (HxW) pixels is smaller than the finest " + std::to_string(finest) + "x" +
                                std::to_string(finest) + " grid: every cell needs at least one pixel");
  // Integer floor(i * n / g) (i, n, g >= 0): exact, unlike a floating-point division.
  auto edge = [](int64_t i, int64_t n, int64_t g) { return i * n / g; };
  // round(overlap * extent), half away from zero; extents are small so double is exact enough.
  auto pad = [overlap](int64_t extent) { return static_cast<int64_t>(std::floor(overlap * extent + 0.5)); };
  std::vector<PatchBox> boxes;
  boxes.reserve(patches_per_image(grids));
  for (int g : grids) {
    for (int r = 0; r < g; ++r) {
      int64_t y0 = edge(r, height, g), y1 = edge(r + 1, height, g);
      const int64_t py = pad(y1 - y0);
      y0 = std::max<int64_t>(0, y0 - py);
      y1 = std::min<int64_t>(height, y1 + py);
      for (int c = 0; c < g; ++c) {
        int64_t x0 = edge(c, width, g), x1 = edge(c + 1, width, g);
        const int64_t px = pad(x1 - x0);
        x0 = std::max<int64_t>(0, x0 - px);
        x1 = std::min<int64_t>(width, x1 + px);
        boxes.push_back({static_cast<int32_t>(x0), static_cast<int32_t>(y0), static_cast<int32_t>(x1),
                         static_cast<int32_t>(y1), g, r * g + c});
      }
    }
  }
  return boxes;
}

// ------------------------------------------------------------------------------------------------ resampling
namespace tiler_detail {

constexpr int kPrecisionBits = 32 - 8 - 2;  // Pillow's PRECISION_BITS: 8-bit values, 2 bits of headroom
constexpr int32_t kHalf = 1 << (kPrecisionBits - 1);

inline double bilinear_filter(double x) {
  if (x < 0.0) x = -x;
  if (x < 1.0) return 1.0 - x;
  return 0.0;
}

inline double bicubic_filter(double x) {  // Keys cubic with a = -0.5, written as Pillow writes it
  const double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

// Fixed-point 1-D resampling weights from in_size samples to out_size, exactly Pillow's precompute_coeffs +
// normalize_coeffs_8bpc for the box (0, in_size): output i reads inputs [first[i], first[i] + count[i]) with
// weights[i * stride ...].
struct Coefficients {
  int stride = 0;
  std::vector<int32_t> first, count, weights;
};

inline void compute_coefficients(int in_size, int out_size, Interpolation interpolation, Coefficients& co) {
  const double support_1 = interpolation == Interpolation::bicubic ? 2.0 : 1.0;
  const double scale = static_cast<double>(static_cast<float>(in_size) - 0.0f) / out_size;
  const double filterscale = scale < 1.0 ? 1.0 : scale;  // widen the kernel only when shrinking (antialias)
  const double support = support_1 * filterscale;
  co.stride = static_cast<int>(std::ceil(support)) * 2 + 1;
  co.first.resize(out_size);
  co.count.resize(out_size);
  co.weights.assign(static_cast<size_t>(out_size) * co.stride, 0);
  std::vector<double> k(co.stride);
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int xmin = static_cast<int>(center - support + 0.5);  // truncation, as Pillow's "round"
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      const double arg = (x + xmin - center + 0.5) * ss;
      const double w = interpolation == Interpolation::bicubic ? bicubic_filter(arg) : bilinear_filter(arg);
      k[x] = w;
      ww += w;
    }
    int32_t* out = &co.weights[static_cast<size_t>(xx) * co.stride];
    for (int x = 0; x < xmax; ++x) {
      const double v = ww != 0.0 ? k[x] / ww : k[x];
      out[x] = v < 0 ? static_cast<int32_t>(-0.5 + v * (1 << kPrecisionBits))
                     : static_cast<int32_t>(0.5 + v * (1 << kPrecisionBits));
    }
    co.first[xx] = xmin;
    co.count[xx] = xmax;
  }
}

// dst[j] = clip8(half + sum_k w[k] * src[k * stride + j]) for j < kLanes: one output position of the horizontal
// pass for 16 RGB rows at once, or 48 bytes of one output row of the vertical pass. A fixed width lets the 48
// accumulators live in registers across all taps.
constexpr int kLanes = 48;

static void convolve_lanes_generic(const uint8_t* src, ptrdiff_t stride, const int32_t* w, int taps, uint8_t* dst) {
  int32_t acc[kLanes];
  for (int j = 0; j < kLanes; ++j) acc[j] = kHalf;
  for (int k = 0; k < taps; ++k) {
    const uint8_t* s = src + k * stride;
    const int32_t wk = w[k];
    for (int j = 0; j < kLanes; ++j) acc[j] += wk * static_cast<int32_t>(s[j]);
  }
  // Pillow's clip8: arithmetic shift, then clamp to [0, 255].
  for (int j = 0; j < kLanes; ++j) dst[j] = static_cast<uint8_t>(std::min(255, std::max(0, acc[j] >> kPrecisionBits)));
}

#if PATCHIFY_X86
// The same with AVX2 intrinsics: six 8-lane accumulators stay in registers (the auto-vectorised version spills
// them every tap), and the saturating packs do the clip exactly (acc >> 22 is within [-640, 639]).
#define PATCHIFY_AVX2 __attribute__((target("avx2"), always_inline)) static inline
PATCHIFY_AVX2 __m256i widen_avx2(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
PATCHIFY_AVX2 __m256i pack16_avx2(__m256i x, __m256i y) {  // (x >> 22, y >> 22) as 16 int16, in order
  return _mm256_permute4x64_epi64(
      _mm256_packs_epi32(_mm256_srai_epi32(x, kPrecisionBits), _mm256_srai_epi32(y, kPrecisionBits)), 0xD8);
}
#undef PATCHIFY_AVX2

__attribute__((target("avx2"))) static void convolve_lanes_avx2(const uint8_t* src, ptrdiff_t stride,
                                                                 const int32_t* w, int taps, uint8_t* dst) {
  const __m256i half = _mm256_set1_epi32(kHalf);
  __m256i a0 = half, a1 = half, a2 = half, a3 = half, a4 = half, a5 = half;
  for (int k = 0; k < taps; ++k) {
    const uint8_t* s = src + k * stride;
    const __m256i wk = _mm256_set1_epi32(w[k]);
    a0 = _mm256_add_epi32(a0, _mm256_mullo_epi32(wk, widen_avx2(s)));
    a1 = _mm256_add_epi32(a1, _mm256_mullo_epi32(wk, widen_avx2(s + 8)));
    a2 = _mm256_add_epi32(a2, _mm256_mullo_epi32(wk, widen_avx2(s + 16)));
    a3 = _mm256_add_epi32(a3, _mm256_mullo_epi32(wk, widen_avx2(s + 24)));
    a4 = _mm256_add_epi32(a4, _mm256_mullo_epi32(wk, widen_avx2(s + 32)));
    a5 = _mm256_add_epi32(a5, _mm256_mullo_epi32(wk, widen_avx2(s + 40)));
  }
  // int32 -> int16 -> uint8 with saturation; packs work per 128-bit lane, the permutes restore the order.
  const __m256i p01 = pack16_avx2(a0, a1), p23 = pack16_avx2(a2, a3), p45 = pack16_avx2(a4, a5);
  const __m256i b0 = _mm256_permute4x64_epi64(_mm256_packus_epi16(p01, p23), 0xD8);
  const __m256i b1 = _mm256_permute4x64_epi64(_mm256_packus_epi16(p45, p45), 0xD8);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), b0);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 32), _mm256_castsi256_si128(b1));
}
#endif

inline void convolve_lanes(const uint8_t* src, ptrdiff_t stride, const int32_t* w, int taps, uint8_t* dst) {
#if PATCHIFY_X86
  if (has_avx2()) return convolve_lanes_avx2(src, stride, w, taps, dst);
#endif
  convolve_lanes_generic(src, stride, w, taps, dst);
}

// Same for the n < kLanes tail of a row.
static void convolve_tail(const uint8_t* src, ptrdiff_t stride, const int32_t* w, int taps, int n, uint8_t* dst) {
  int32_t acc[kLanes];
  for (int j = 0; j < n; ++j) acc[j] = kHalf;
  for (int k = 0; k < taps; ++k) {
    const uint8_t* s = src + k * stride;
    for (int j = 0; j < n; ++j) acc[j] += w[k] * static_cast<int32_t>(s[j]);
  }
  for (int j = 0; j < n; ++j) dst[j] = static_cast<uint8_t>(std::min(255, std::max(0, acc[j] >> kPrecisionBits)));
}

inline void convolve_row(const uint8_t* src, ptrdiff_t stride, const int32_t* w, int taps, int n, uint8_t* dst) {
  int j = 0;
  for (; j + kLanes <= n; j += kLanes) convolve_lanes(src + j, stride, w, taps, dst + j);
  if (j < n) convolve_tail(src + j, stride, w, taps, n - j, dst + j);
}

}  // namespace tiler_detail

// A read-only HxWx3 uint8 image with byte strides (any sign), so numpy views need no copy.
struct ImageView {
  const uint8_t* data = nullptr;
  int64_t height = 0, width = 0;
  ptrdiff_t row_stride = 0, col_stride = 3, channel_stride = 1;

  static ImageView contiguous(const uint8_t* data, int64_t height, int64_t width) {
    return ImageView{data, height, width, static_cast<ptrdiff_t>(width * 3), 3, 1};
  }
  const uint8_t* pixel(int64_t y, int64_t x) const { return data + y * row_stride + x * col_stride; }
};

// What the backbone wants: output side, filter, and the per-channel normalisation (x / 255 - mean) / std.
struct PatchFormat {
  int input_size = 224;
  Interpolation interpolation = Interpolation::bicubic;
  std::array<float, 3> mean{{0.485f, 0.456f, 0.406f}};
  std::array<float, 3> std{{0.229f, 0.224f, 0.225f}};
  OutputType output = OutputType::float32;
};

// Copies n RGB pixels of row y from column x0 to dst, pixel i at dst + i * dst_step. Strides are read into
// locals (uint8 stores may alias anything, so the compiler would otherwise reload them per pixel), and the
// common packed layout gets its own loop with constant strides.
inline void copy_pixels(const ImageView& image, int64_t y, int64_t x0, int n, uint8_t* dst, ptrdiff_t dst_step) {
  const uint8_t* p = image.pixel(y, x0);
  const ptrdiff_t cs = image.col_stride, chs = image.channel_stride;
  if (cs == 3 && chs == 1) {
    for (int x = 0; x < n; ++x, p += 3, dst += dst_step) {
      const uint8_t r = p[0], g = p[1], b = p[2];
      dst[0] = r;
      dst[1] = g;
      dst[2] = b;
    }
    return;
  }
  for (int x = 0; x < n; ++x, p += cs, dst += dst_step) {
    const uint8_t r = p[0], g = p[chs], b = p[2 * chs];
    dst[0] = r;
    dst[1] = g;
    dst[2] = b;
  }
}

// Per-thread buffers, reused across patches (sizes vary per patch; they only grow).
struct TilerScratch {
  tiler_detail::Coefficients horizontal, vertical;
  std::vector<uint8_t> block;   // 16 source rows transposed: block[x * 48 + r * 3 + c]
  std::vector<uint8_t> first;   // result of the first pass (packed RGB rows)
  std::vector<uint8_t> second;  // result of the second pass, or a packed copy of strided input
};

// Pillow (since PR #9549, Pillow 12/13) runs the vertical pass first when the height shrinks much more than the
// width. Its exact rule is not documented; this one reproduces it on every size pair we probed against Pillow
// 13 (7000 shapes, both filters): vertical first iff in_h > out_h and in_h - out_h > 2 * (in_w - out_w).
inline bool pillow_vertical_first(int in_w, int in_h, int out_w, int out_h) {
  return in_h > out_h && static_cast<int64_t>(in_h) - out_h > 2 * (static_cast<int64_t>(in_w) - out_w);
}

namespace tiler_detail {

// Fills the transposed block: pixel (y + r, x0 + x) of `src` goes to block[x * 48 + r * 3 ...], r < nr.
// Works in tiles of 64 columns so that the 16 destination slots of each column stay in L1, and moves packed
// pixels as 4-byte words: the extra byte lands in the next row's slot, which that row overwrites next (the last
// row and each tile's last pixel are copied exactly, so nothing outside the pixel row is read or clobbered).
inline void fill_block(const ImageView& src, int64_t y, int64_t x0, int nr, int width, uint8_t* block) {
  constexpr int kRows = kLanes / 3, kTile = 64;
  const bool packed = src.col_stride == 3 && src.channel_stride == 1;
  for (int t0 = 0; t0 < width; t0 += kTile) {
    const int tn = std::min(kTile, width - t0);
    for (int r = 0; r < nr; ++r) {
      uint8_t* d = block + static_cast<size_t>(t0) * kLanes + r * 3;
      if (packed && r + 1 < kRows) {
        const uint8_t* p = src.pixel(y + r, x0 + t0);
        for (int x = 0; x + 1 < tn; ++x) {
          uint32_t word;
          std::memcpy(&word, p + 3 * x, 4);
          std::memcpy(d + static_cast<size_t>(x) * kLanes, &word, 4);
        }
        copy_pixels(src, y + r, x0 + t0 + tn - 1, 1, d + static_cast<size_t>(tn - 1) * kLanes, kLanes);
      } else {
        copy_pixels(src, y + r, x0 + t0, tn, d, kLanes);
      }
    }
  }
}

// Horizontal pass of rows [y_begin, y_begin + n_rows) x columns [x_begin, x_begin + width) of `src` into
// dst (n_rows rows of out_w RGB pixels, dst_stride >= out_w * 3 + 1 bytes apart: the spare byte lets each pixel
// be stored as one 4-byte word). Coefficient positions are relative to column x_begin - shift.
inline void horizontal_pass(const ImageView& src, int64_t y_begin, int64_t x_begin, int n_rows, int width,
                            const Coefficients& co, int shift, int out_w, uint8_t* dst, size_t dst_stride,
                            TilerScratch& s) {
  constexpr int kRows = kLanes / 3;  // source rows per block
  s.block.resize(static_cast<size_t>(width) * kLanes);
  uint8_t out[kLanes + 4];
  for (int r0 = 0; r0 < n_rows; r0 += kRows) {
    const int nr = std::min(kRows, n_rows - r0);
    // Transpose 16 source rows so that each source column is 48 contiguous bytes: the horizontal filter then
    // becomes a weighted sum of contiguous vectors, like the vertical one. (Slots of rows >= nr keep stale but
    // initialised bytes; their results are discarded.)
    fill_block(src, y_begin + r0, x_begin, nr, width, s.block.data());
    for (int xx = 0; xx < out_w; ++xx) {
      convolve_lanes(s.block.data() + static_cast<size_t>(co.first[xx] - shift) * kLanes, kLanes,
                     &co.weights[static_cast<size_t>(xx) * co.stride], co.count[xx], out);
      uint8_t* d = dst + static_cast<size_t>(r0) * dst_stride + xx * 3;
      for (int r = 0; r < nr; ++r, d += dst_stride) std::memcpy(d, out + r * 3, 4);  // 4th byte: next pixel's
    }
  }
}

// Vertical pass: output row yy = weighted rows of `src` (packed rows `stride` bytes apart, `row_bytes` used).
inline void vertical_pass(const uint8_t* src, ptrdiff_t stride, size_t row_bytes, const Coefficients& co, int shift,
                          int out_h, uint8_t* dst) {
  for (int yy = 0; yy < out_h; ++yy)
    convolve_row(src + (co.first[yy] - shift) * stride, stride, &co.weights[static_cast<size_t>(yy) * co.stride],
                 co.count[yy], static_cast<int>(row_bytes), dst + static_cast<size_t>(yy) * row_bytes);
}

}  // namespace tiler_detail

// Resamples the crop [x0, x1) x [y0, y1) of `image` to out_w x out_h RGB exactly as Pillow's
// crop(box).resize((out_w, out_h), filter) and calls emit(y, row) for each output row (out_w * 3 bytes, RGB).
template <class Emit>
void resample_crop(const ImageView& image, int64_t x0, int64_t y0, int64_t x1, int64_t y1, int out_w, int out_h,
                   Interpolation interpolation, TilerScratch& s, Emit&& emit) {
  using namespace tiler_detail;
  const int cw = static_cast<int>(x1 - x0), ch = static_cast<int>(y1 - y0);
  const size_t out_row = static_cast<size_t>(out_w) * 3;
  const size_t padded_row = out_row + 1;  // rows written by horizontal_pass
  // Pillow skips a pass whose size is unchanged (its coefficients would be the identity anyway).
  const bool need_h = cw != out_w, need_v = ch != out_h;
  if (need_h) compute_coefficients(cw, out_w, interpolation, s.horizontal);
  if (need_v) compute_coefficients(ch, out_h, interpolation, s.vertical);
  const bool packed = image.col_stride == 3 && image.channel_stride == 1;

  if (need_h && need_v && pillow_vertical_first(cw, ch, out_w, out_h)) {
    // Vertical pass over the columns the horizontal pass reads, then the horizontal pass.
    const int col_first = s.horizontal.first.front();
    const int n_cols = s.horizontal.first.back() + s.horizontal.count.back() - col_first;
    const size_t col_bytes = static_cast<size_t>(n_cols) * 3;
    const uint8_t* src;
    ptrdiff_t stride;
    if (packed) {  // read the image rows in place
      src = image.pixel(y0, x0 + col_first);
      stride = image.row_stride;
    } else {  // strided pixels: pack the crop first
      s.second.resize(static_cast<size_t>(ch) * col_bytes);
      for (int r = 0; r < ch; ++r) copy_pixels(image, y0 + r, x0 + col_first, n_cols, s.second.data() + r * col_bytes, 3);
      src = s.second.data();
      stride = static_cast<ptrdiff_t>(col_bytes);
    }
    s.first.resize(static_cast<size_t>(out_h) * col_bytes);
    vertical_pass(src, stride, col_bytes, s.vertical, 0, out_h, s.first.data());
    s.second.resize(static_cast<size_t>(out_h) * padded_row);
    horizontal_pass(ImageView::contiguous(s.first.data(), out_h, n_cols), 0, 0, out_h, n_cols, s.horizontal,
                    col_first, out_w, s.second.data(), padded_row, s);
    for (int y = 0; y < out_h; ++y) emit(y, s.second.data() + static_cast<size_t>(y) * padded_row);
    return;
  }

  // Horizontal pass first, over only the rows the vertical pass reads (Pillow's ybox_first / ybox_last).
  int row_first = 0, n_rows = ch;
  if (need_v) {
    row_first = s.vertical.first.front();
    n_rows = s.vertical.first.back() + s.vertical.count.back() - row_first;
  }
  const uint8_t* rows;
  ptrdiff_t stride;
  if (need_h) {
    s.first.resize(static_cast<size_t>(n_rows) * padded_row);
    horizontal_pass(image, y0 + row_first, x0, n_rows, cw, s.horizontal, 0, out_w, s.first.data(), padded_row, s);
    rows = s.first.data();
    stride = static_cast<ptrdiff_t>(padded_row);
  } else if (packed) {  // cw == out_w: the crop rows are the input of the vertical pass
    rows = image.pixel(y0 + row_first, x0);
    stride = image.row_stride;
  } else {
    s.first.resize(static_cast<size_t>(n_rows) * out_row);
    for (int r = 0; r < n_rows; ++r)
      copy_pixels(image, y0 + row_first + r, x0, cw, s.first.data() + static_cast<size_t>(r) * out_row, 3);
    rows = s.first.data();
    stride = static_cast<ptrdiff_t>(out_row);
  }
  if (!need_v) {
    for (int y = 0; y < out_h; ++y) emit(y, rows + y * stride);
    return;
  }
  s.second.resize(static_cast<size_t>(out_h) * out_row);
  vertical_pass(rows, stride, out_row, s.vertical, row_first, out_h, s.second.data());
  for (int y = 0; y < out_h; ++y) emit(y, s.second.data() + static_cast<size_t>(y) * out_row);
}

// Convenience for tests: the resampled crop as an out_h x out_w x 3 uint8 buffer.
inline std::vector<uint8_t> resample_crop_rgb(const ImageView& image, int64_t x0, int64_t y0, int64_t x1, int64_t y1,
                                              int out_w, int out_h, Interpolation interpolation) {
  TilerScratch scratch;
  std::vector<uint8_t> out(static_cast<size_t>(out_w) * out_h * 3);
  resample_crop(image, x0, y0, x1, y1, out_w, out_h, interpolation, scratch, [&](int y, const uint8_t* row) {
    std::memcpy(out.data() + static_cast<size_t>(y) * out_w * 3, row, static_cast<size_t>(out_w) * 3);
  });
  return out;
}

// Lookup table from a uint8 value to its normalised output per channel: exact, and the same float32 operations
// as the reference ((x / 255 - mean) / std in float32) so both agree bit for bit.
struct NormalisationTable {
  float f32[3][256];
  uint16_t f16[3][256];

  explicit NormalisationTable(const PatchFormat& format) {
    for (int c = 0; c < 3; ++c) {
      for (int v = 0; v < 256; ++v) {
        const float scaled = static_cast<float>(v) / 255.0f;
        f32[c][v] = (scaled - format.mean[c]) / format.std[c];
        f16[c][v] = float_to_half(f32[c][v]);
      }
    }
  }
};

// Writes one patch (3 x s x s, channel-major) into `out` (float or uint16 half bits).
inline void write_patch(const ImageView& image, const PatchBox& box, const PatchFormat& format,
                        const NormalisationTable& table, void* out, TilerScratch& scratch) {
  const int s = format.input_size;
  const size_t plane = static_cast<size_t>(s) * s;
  auto emit_f32 = [&](int y, const uint8_t* row) {
    float* base = static_cast<float*>(out) + static_cast<size_t>(y) * s;
    for (int c = 0; c < 3; ++c) {
      float* d = base + c * plane;
      const float* lut = table.f32[c];
      for (int x = 0; x < s; ++x) d[x] = lut[row[x * 3 + c]];
    }
  };
  auto emit_f16 = [&](int y, const uint8_t* row) {
    uint16_t* base = static_cast<uint16_t*>(out) + static_cast<size_t>(y) * s;
    for (int c = 0; c < 3; ++c) {
      uint16_t* d = base + c * plane;
      const uint16_t* lut = table.f16[c];
      for (int x = 0; x < s; ++x) d[x] = lut[row[x * 3 + c]];
    }
  };
  if (format.output == OutputType::float32)
    resample_crop(image, box.x0, box.y0, box.x1, box.y1, s, s, format.interpolation, scratch, emit_f32);
  else
    resample_crop(image, box.x0, box.y0, box.x1, box.y1, s, s, format.interpolation, scratch, emit_f16);
}

// Result rows, one per patch, aligned with the batch: image index and box.
struct TiledPatch {
  int32_t image;
  PatchBox box;
};

// Tiles every image into the patches of `grids` and writes them, in order (image by image, then patch_boxes
// order), into `out`: out_capacity patches of 3 x s x s values (float32, or float16 bits). Throws
// std::invalid_argument naming the image when one is too small for the grid or out is too small; nothing is
// written then. Parallel over patches, so one large image does not serialise the batch.
inline std::vector<TiledPatch> tile_images(const std::vector<ImageView>& images, const std::vector<int>& grids,
                                           const PatchFormat& format, double overlap, void* out,
                                           size_t out_capacity, int num_threads) {
  if (format.input_size < 1) throw std::invalid_argument("input_size must be >= 1");
  for (int c = 0; c < 3; ++c) {
    if (!(format.std[c] > 0.0f) || !std::isfinite(format.mean[c]) || !std::isfinite(format.std[c]))
      throw std::invalid_argument("std must be > 0 and mean/std finite");
  }
  validate_grids(grids);
  validate_overlap(overlap);
  std::vector<TiledPatch> patches;
  patches.reserve(images.size() * patches_per_image(grids));
  for (size_t i = 0; i < images.size(); ++i) {
    std::vector<PatchBox> boxes;
    try {
      boxes = patch_boxes(images[i].height, images[i].width, grids, overlap);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument("image " + std::to_string(i) + ": " + e.what());
    }
    for (const auto& b : boxes) patches.push_back({static_cast<int32_t>(i), b});
  }
  if (patches.size() > out_capacity)
    throw std::invalid_argument("out holds " + std::to_string(out_capacity) + " patches, " +
                                std::to_string(patches.size()) + " are needed");
  if (patches.empty()) return patches;
  const NormalisationTable table(format);
  const size_t patch_values = 3 * static_cast<size_t>(format.input_size) * format.input_size;
  const size_t value_bytes = format.output == OutputType::float32 ? 4 : 2;
  // One task per worker, each pulling patches from a shared counter: scratch buffers live per worker, and
  // the dynamic hand-out balances whole-image patches against small grid cells.
  const size_t workers = std::min<size_t>(static_cast<size_t>(resolve_num_threads(num_threads)), patches.size());
  std::atomic<size_t> next{0};
  parallel_for(0, workers, static_cast<int>(workers), [&](size_t) {
    TilerScratch scratch;
    for (size_t p = next.fetch_add(1); p < patches.size(); p = next.fetch_add(1)) {
      void* dst = static_cast<uint8_t*>(out) + p * patch_values * value_bytes;
      write_patch(images[patches[p].image], patches[p].box, format, table, dst, scratch);
    }
  });
  return patches;
}

}  // namespace patchify
