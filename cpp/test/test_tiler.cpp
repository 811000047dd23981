// Tiler unit tests: grid boxes, Pillow-compatible resampling on hand-checked cases, normalisation, float16
// output (the conversion itself: test_half.cpp), strided input and thread independence. (Bit-equality with Pillow itself is tested from Python.)
#include "patchify/tiler.h"

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "check.h"

using namespace patchify;

static void test_patch_boxes() {
  CHECK(patches_per_image({1}) == 1);
  CHECK(patches_per_image({1, 2}) == 5);
  CHECK(patches_per_image({1, 2, 3}) == 14);
  CHECK(patches_per_image({1, 2, 3, 4}) == 30);

  const auto boxes = patch_boxes(7, 10, {1, 2, 3});
  CHECK(boxes.size() == 14);
  CHECK(boxes[0].x0 == 0 && boxes[0].y0 == 0 && boxes[0].x1 == 10 && boxes[0].y1 == 7 && boxes[0].grid == 1);
  // 2x2 on 10 wide x 7 high: x edges 0, 5, 10; y edges 0, 3, 7; row-major.
  CHECK(boxes[1].x0 == 0 && boxes[1].x1 == 5 && boxes[1].y0 == 0 && boxes[1].y1 == 3 && boxes[1].cell == 0);
  CHECK(boxes[2].x0 == 5 && boxes[2].x1 == 10 && boxes[2].y1 == 3 && boxes[2].cell == 1);
  CHECK(boxes[3].y0 == 3 && boxes[3].y1 == 7 && boxes[3].x0 == 0 && boxes[3].cell == 2);
  // 3x3: x edges floor(c*10/3) = 0, 3, 6, 10; y edges 0, 2, 4, 7.
  CHECK(boxes[5].grid == 3 && boxes[5].x1 == 3 && boxes[5].y1 == 2);
  CHECK(boxes[13].x0 == 6 && boxes[13].x1 == 10 && boxes[13].y0 == 4 && boxes[13].y1 == 7 && boxes[13].cell == 8);

  // Cells of every grid tile the image exactly: areas sum to H * W.
  for (int g = 1; g <= 9; ++g) {
    long long area = 0;
    for (const auto& b : patch_boxes(101, 37, {g})) {
      CHECK(b.x1 > b.x0 && b.y1 > b.y0);
      area += static_cast<long long>(b.x1 - b.x0) * (b.y1 - b.y0);
    }
    CHECK(area == 101LL * 37);
  }

  // Overlap: each side grows by round(overlap * extent), clipped to the image.
  const auto o = patch_boxes(100, 200, {2}, 0.25);
  CHECK(o[0].x0 == 0 && o[0].x1 == 125 && o[0].y0 == 0 && o[0].y1 == 63);  // 100 wide cell +25; 50 high +12.5 -> 13
  CHECK(o[3].x0 == 75 && o[3].x1 == 200 && o[3].y0 == 37 && o[3].y1 == 100);

  // Image smaller than the finest grid, bad grids, bad overlap.
  CHECK_THROWS(patch_boxes(3, 100, {1, 2, 3, 4}), std::invalid_argument);
  CHECK_THROWS(patch_boxes(0, 10, {1}), std::invalid_argument);
  CHECK_THROWS(patch_boxes(10, 10, {0}), std::invalid_argument);
  CHECK_THROWS(patch_boxes(10, 10, {}), std::invalid_argument);
  CHECK_THROWS(patch_boxes(10, 10, {1}, -0.1), std::invalid_argument);
  CHECK_THROWS(patch_boxes(10, 10, {1}, 1.0), std::invalid_argument);
  CHECK(patch_boxes(1, 1, {1}).size() == 1);
  CHECK(parse_interpolation("bicubic") == Interpolation::bicubic);
  CHECK_THROWS(parse_interpolation("nearest"), std::invalid_argument);
}

static void test_resample_known_values() {
  // 2 -> 1 pixel bilinear: both taps weigh 0.5; Pillow rounds half up: (10 + 21) / 2 = 15.5 -> 16.
  const uint8_t two[] = {10, 10, 10, 21, 21, 21};
  auto r = resample_crop_rgb(ImageView::contiguous(two, 1, 2), 0, 0, 2, 1, 1, 1, Interpolation::bilinear);
  CHECK(r[0] == 16 && r[1] == 16 && r[2] == 16);

  // Same size: identity (no pass runs), also for a crop.
  std::mt19937 rng(1);
  std::vector<uint8_t> img(13 * 17 * 3);
  for (auto& v : img) v = static_cast<uint8_t>(rng() & 0xff);
  const auto view = ImageView::contiguous(img.data(), 13, 17);
  auto same = resample_crop_rgb(view, 2, 3, 9, 11, 7, 8, Interpolation::bicubic);
  bool identical = true;
  for (int y = 0; y < 8; ++y)
    for (int x = 0; x < 7; ++x)
      for (int c = 0; c < 3; ++c) identical &= same[(y * 7 + x) * 3 + c] == img[((y + 3) * 17 + x + 2) * 3 + c];
  CHECK(identical);

  // A constant image stays constant through up- and down-scaling (weights sum to 1 in fixed point).
  std::vector<uint8_t> flat(31 * 29 * 3, 0);
  for (size_t i = 0; i < flat.size(); i += 3) { flat[i] = 200; flat[i + 1] = 7; flat[i + 2] = 255; }
  for (auto interp : {Interpolation::bilinear, Interpolation::bicubic}) {
    for (int s : {1, 5, 29, 64}) {
      auto out = resample_crop_rgb(ImageView::contiguous(flat.data(), 31, 29), 0, 0, 29, 31, s, s, interp);
      bool constant = true;
      for (size_t i = 0; i < out.size(); i += 3) constant &= out[i] == 200 && out[i + 1] == 7 && out[i + 2] == 255;
      CHECK(constant);
    }
  }

  // 1-pixel image upscaled: every output pixel equals it.
  const uint8_t one[] = {1, 128, 250};
  auto up = resample_crop_rgb(ImageView::contiguous(one, 1, 1), 0, 0, 1, 1, 9, 9, Interpolation::bicubic);
  CHECK(up[0] == 1 && up[1] == 128 && up[2] == 250 && up[up.size() - 1] == 250);

  // Strided view (every other column, channels reversed) equals the same pixels copied contiguously.
  std::vector<uint8_t> copy(13 * 9 * 3);
  for (int y = 0; y < 13; ++y)
    for (int x = 0; x < 9; ++x)
      for (int c = 0; c < 3; ++c) copy[(y * 9 + x) * 3 + c] = img[(y * 17 + 2 * x) * 3 + (2 - c)];
  ImageView strided{img.data() + 2, 13, 9, 17 * 3, 6, -1};
  auto a = resample_crop_rgb(strided, 1, 2, 8, 13, 20, 6, Interpolation::bicubic);
  auto b = resample_crop_rgb(ImageView::contiguous(copy.data(), 13, 9), 1, 2, 8, 13, 20, 6, Interpolation::bicubic);
  CHECK(a == b);
}

static void test_tile_images() {
  std::mt19937 rng(7);
  std::vector<std::vector<uint8_t>> pixels;
  std::vector<ImageView> images;
  const int sizes[][2] = {{40, 57}, {64, 64}, {9, 300}};
  for (const auto& hw : sizes) {
    pixels.emplace_back(static_cast<size_t>(hw[0]) * hw[1] * 3);
    for (auto& v : pixels.back()) v = static_cast<uint8_t>(rng() & 0xff);
  }
  for (size_t i = 0; i < pixels.size(); ++i) images.push_back(ImageView::contiguous(pixels[i].data(), sizes[i][0], sizes[i][1]));
  PatchFormat format;
  format.input_size = 16;
  const std::vector<int> grids = {1, 2, 3};
  const size_t per = 3 * 16 * 16;
  std::vector<float> one(3 * 14 * per), two(3 * 14 * per);
  auto p1 = tile_images(images, grids, format, 0.1, one.data(), 3 * 14, 1);
  auto p2 = tile_images(images, grids, format, 0.1, two.data(), 3 * 14, 4);
  CHECK(p1.size() == 42 && p2.size() == 42);
  CHECK(one == two);
  CHECK(p1[14].image == 1 && p1[14].box.grid == 1 && p1[41].box.cell == 8);

  // Whole-image patch equals resample + normalise table.
  auto rgb = resample_crop_rgb(images[0], 0, 0, 57, 40, 16, 16, Interpolation::bicubic);
  NormalisationTable table(format);
  bool same = true;
  for (int c = 0; c < 3; ++c)
    for (int i = 0; i < 256; ++i) same &= one[c * 256 + i] == table.f32[c][rgb[i * 3 + c]];
  CHECK(same);
  CHECK_NEAR(table.f32[0][255], (1.0 - 0.485) / 0.229, 1e-5);

  // float16 output holds the rounded float32 values.
  format.output = OutputType::float16;
  std::vector<uint16_t> half(3 * 14 * per);
  tile_images(images, grids, format, 0.1, half.data(), 3 * 14, 2);
  bool halves = true;
  for (size_t i = 0; i < one.size(); ++i) halves &= half[i] == float_to_half(one[i]);
  CHECK(halves);

  // Errors name the image; a too-small out is refused before anything is written.
  CHECK_THROWS(tile_images(images, grids, format, 0.0, half.data(), 10, 1), std::invalid_argument);
  const uint8_t tiny[] = {1, 2, 3, 4, 5, 6};
  std::vector<ImageView> bad = {images[0], ImageView::contiguous(tiny, 1, 2)};
  bool named = false;
  try {
    tile_images(bad, grids, format, 0.0, half.data(), 3 * 14, 1);
  } catch (const std::invalid_argument& e) {
    named = std::string(e.what()).find("image 1") != std::string::npos;
  }
  CHECK(named);
}

static void test_kernels_agree() {
  // The AVX2 kernel (used when the CPU has it) and the portable one give identical bytes, clipping included.
  std::mt19937 rng(3);
  std::vector<uint8_t> src(20 * 64);
  for (auto& v : src) v = static_cast<uint8_t>(rng() & 0xff);
  for (int taps = 1; taps <= 20; ++taps) {
    std::vector<int32_t> w(taps);
    // Large and negative weights (beyond any real filter, so clipping both ways happens), bounded so that the
    // int32 sums cannot overflow: |sum| <= 255 * 2^23.
    const int32_t bound = (1 << 23) / taps;
    for (auto& v : w) v = static_cast<int32_t>(rng() % (2u * bound)) - bound;
    uint8_t a[tiler_detail::kLanes], b[tiler_detail::kLanes];
    tiler_detail::convolve_lanes_generic(src.data(), 64, w.data(), taps, a);
    tiler_detail::convolve_lanes(src.data(), 64, w.data(), taps, b);
    CHECK(std::equal(a, a + tiler_detail::kLanes, b));
  }
}

int main() {
  test_kernels_agree();
  test_patch_boxes();
  test_resample_known_values();
  test_tile_images();
  return TEST_MAIN_RESULT();
}
