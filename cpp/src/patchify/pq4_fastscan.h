// 4-bit PQ "fast-scan" kernels: codes of 16 centroids per sub-quantiser, scanned 32 vectors at a time with the
// per-sub-quantiser lookup tables quantised to uint8 and held in SIMD registers (AVX2 _mm256_shuffle_epi8 does 32
// table lookups in one instruction), the idea of faiss's IndexPQFastScan / IndexIVFPQFastScan (André et al.,
// "Quicker ADC"). The fused IVFPQ scanner (ivfpq_scan.h) uses these to scan faiss IndexIVFPQFastScan inverted lists
// with the per-image max inside the scan, which faiss's own fast-scan result handlers cannot do.
//
// Code layout (faiss's pq4_pack_codes with bbs = 32, read in place from faiss's BlockInvertedLists): a list is a
// sequence of blocks of 32 vectors; a block holds, per pair of sub-quantisers (2p, 2p+1), 32 bytes:
//   bytes 0..15  : codes of sub-quantiser 2p,   byte j = vector kPq4Perm[j] (low nibble), kPq4Perm[j] + 16 (high)
//   bytes 16..31 : codes of sub-quantiser 2p+1, same arrangement
// with kPq4Perm = 0, 8, 1, 9, ..., 7, 15, so that the even bytes of a shuffle result are vectors 0..7 and the odd
// bytes vectors 8..15 (their 16-bit sums then come out in vector order). M odd is padded with a zero sub-quantiser
// (nsq = M rounded up to even). A block is nsq * 16 bytes; the last block of a list is padded.
//
// Table quantisation (one scale for all sub-quantisers, each its own offset, like faiss's quantize_LUT): entry
// q[m][c] = round((t[m][c] - min_m) * a) in 0..255 with a = 255 / (largest span max_m - min_m), so a score is
// dis0 + offset + acc / a, offset = sum_m min_m, acc = the sum of M uint8 entries (fits 16 bits for M <= 256).
// The scalar and AVX2 kernels add the same integers, so they give bit-identical scores.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "patchify/cpu_features.h"
#include "patchify/round.h"

namespace patchify {

constexpr size_t kPq4BlockVectors = 32;  // vectors per block (faiss's bbs)
constexpr size_t kPq4MaxM = 256;        // 255 * M must fit a uint16 accumulator
constexpr size_t kPq4PrefetchBytes = 2048;  // how far ahead of the block being summed the AVX2 scan prefetches

// Sub-quantisers padded to even, and bytes per block of 32 vectors.
inline size_t pq4_nsq(size_t M) { return (M + 1) / 2 * 2; }
inline size_t pq4_block_bytes(size_t M) { return pq4_nsq(M) * 16; }
// Bytes faiss stores for a list of n vectors: whole blocks.
inline size_t pq4_list_bytes(size_t n, size_t M) {
  return (n + kPq4BlockVectors - 1) / kPq4BlockVectors * pq4_block_bytes(M);
}

namespace detail {

// Byte j of a 16-byte half holds vectors kPq4Perm[j] (low nibble) and kPq4Perm[j] + 16 (high nibble).
constexpr uint8_t kPq4Perm[16] = {0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15};

}  // namespace detail

// The code of vector v (position in its list) for sub-quantiser m: reads one nibble of the packed layout (for the
// tests; the kernels never unpack).
inline uint8_t pq4_packed_code(const uint8_t* list_codes, size_t M, size_t v, size_t m) {
  const uint8_t* block = list_codes + (v / kPq4BlockVectors) * pq4_block_bytes(M);
  const size_t in_block = v % kPq4BlockVectors;
  const size_t low16 = in_block & 15;
  const size_t byte = low16 < 8 ? 2 * low16 : 2 * (low16 - 8) + 1;  // inverse of kPq4Perm
  const uint8_t packed = block[(m / 2) * 32 + (m & 1) * 16 + byte];
  return in_block >= 16 ? static_cast<uint8_t>(packed >> 4) : static_cast<uint8_t>(packed & 15);
}

// Writes the code of vector v for sub-quantiser m into a packed list (the inverse of pq4_packed_code; the layout
// test round-trips faiss's packing through it).
inline void pq4_set_packed_code(uint8_t* list_codes, size_t M, size_t v, size_t m, uint8_t code) {
  uint8_t* block = list_codes + (v / kPq4BlockVectors) * pq4_block_bytes(M);
  const size_t in_block = v % kPq4BlockVectors;
  const size_t low16 = in_block & 15;
  const size_t byte = low16 < 8 ? 2 * low16 : 2 * (low16 - 8) + 1;
  uint8_t& b = block[(m / 2) * 32 + (m & 1) * 16 + byte];
  if (in_block >= 16)
    b = static_cast<uint8_t>((b & 0x0f) | (code << 4));
  else
    b = static_cast<uint8_t>((b & 0xf0) | (code & 0x0f));
}

// One query's tables quantised to uint8, in the kernels' layout: pair p of sub-quantisers is 32 bytes, the 16
// entries of 2p then the 16 of 2p+1 (the two 128-bit lanes of one AVX2 register).
struct Pq4Lut {
  std::vector<uint8_t> packed;  // nsq / 2 x 32
  size_t npairs = 0;
  float scale = 1.f;      // a: accumulator units per score unit
  float inv_scale = 1.f;  // 1 / a
  float offset = 0.f;     // sum over sub-quantisers of the table minimum

  // From the float M x 16 table (table[m * 16 + c]).
  void quantise(const float* table, size_t M) {
    npairs = pq4_nsq(M) / 2;
    packed.assign(npairs * 32, 0);
    float max_span = 0.f;
    offset = 0.f;
    float mins[kPq4MaxM];
    for (size_t m = 0; m < M; ++m) {
      const float* t = table + m * 16;
      const float lo = *std::min_element(t, t + 16), hi = *std::max_element(t, t + 16);
      mins[m] = lo;
      offset += lo;
      max_span = std::max(max_span, hi - lo);
    }
    scale = max_span > 0.f ? 255.f / max_span : 1.f;
    inv_scale = 1.f / scale;
    for (size_t m = 0; m < M; ++m) {
      const float* t = table + m * 16;
      uint8_t* out = packed.data() + (m / 2) * 32 + (m & 1) * 16;
      for (size_t c = 0; c < 16; ++c) {
        const float v = round_nearest((t[c] - mins[m]) * scale);  // ties to even, as std::nearbyint
        out[c] = static_cast<uint8_t>(std::min(255.f, std::max(0.f, v)));
      }
    }
  }

  // The score of an accumulator value in a list whose coarse term is dis0.
  float score(float dis0, uint32_t acc) const { return dis0 + offset + static_cast<float>(acc) * inv_scale; }

  // The smallest accumulator value that can score >= threshold in a list with coarse term dis0, rounded down by a
  // unit so that float rounding never drops a candidate (the caller compares the float score exactly).
  uint16_t floor_acc(float dis0, float threshold) const {
    if (!(threshold > -std::numeric_limits<float>::infinity())) return 0;
    const float x = (threshold - dis0 - offset) * scale;
    if (!(x > 1.f)) return 0;
    if (x >= 65535.f) return 65535;  // unreachable: 255 * M < 65535
    return static_cast<uint16_t>(std::floor(x) - 1.f);
  }
};

namespace detail {

// Scans the n vectors of one packed list: for each block, floor() gives the current accumulator threshold
// (uint16) and hit(j, acc) is called, in list order, for every vector j whose accumulator reaches it. The portable
// version: per pair, each code byte feeds one vector of the first 16 and one of the last 16.
template <class Floor, class Hit>
void pq4_scan_list_portable(const uint8_t* codes, size_t n, const Pq4Lut& lut, Floor&& floor, Hit&& hit) {
  const size_t block_bytes = lut.npairs * 32;
  const uint8_t* table = lut.packed.data();
  for (size_t b0 = 0; b0 < n; b0 += kPq4BlockVectors, codes += block_bytes) {
    uint32_t acc[kPq4BlockVectors] = {};
    for (size_t p = 0; p < lut.npairs; ++p) {
      const uint8_t* c = codes + p * 32;
      const uint8_t* t = table + p * 32;
      for (size_t half = 0; half < 2; ++half)  // sub-quantiser 2p, then 2p+1
        for (size_t j = 0; j < 16; ++j) {
          const uint8_t byte = c[half * 16 + j];
          acc[kPq4Perm[j]] += t[half * 16 + (byte & 15)];
          acc[kPq4Perm[j] + 16] += t[half * 16 + (byte >> 4)];
        }
    }
    const uint32_t lo = floor();
    const size_t m = std::min(kPq4BlockVectors, n - b0);
    for (size_t j = 0; j < m; ++j)
      if (acc[j] >= lo) hit(b0 + j, acc[j]);
  }
}

#if PATCHIFY_X86
// AVX2 version: per pair, one 32-byte load of codes, two shuffles (low nibbles: vectors 0..15, high: 16..31), and
// uint16 sums kept as faiss does: a register viewed as uint16 adds (even byte + 256 * odd byte); a second one adds
// the odd bytes alone (>> 8); even = first - (second << 8) at the end (mod 2^16, exact since sums < 2^16). Lane 0
// holds sub-quantiser 2p's sums, lane 1 2p+1's: adding the two lanes gives the totals, in vector order thanks to
// the kPq4Perm layout. The threshold test is one unsigned compare (max(acc, t) == acc) and a movemask per block.
template <class Floor, class Hit>
__attribute__((target("avx2"))) void pq4_scan_list_avx2(const uint8_t* codes, size_t n, const Pq4Lut& lut,
                                                        Floor&& floor, Hit&& hit) {
  const size_t block_bytes = lut.npairs * 32;
  const size_t list_bytes = (n + kPq4BlockVectors - 1) / kPq4BlockVectors * block_bytes;
  const uint8_t* table = lut.packed.data();
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  for (size_t b0 = 0, pos = 0; b0 < n; b0 += kPq4BlockVectors, pos += block_bytes, codes += block_bytes) {
    // The scan reads a list once, at a few cycles per vector: without help it waits on memory (measured at 1M
    // images: 4.4 ns per vector from RAM vs 1.6 from cache); prefetching ~2 KB ahead keeps loads in flight (2-3).
    for (size_t off = kPq4PrefetchBytes; off < kPq4PrefetchBytes + block_bytes; off += 64)
      if (pos + off < list_bytes) _mm_prefetch(reinterpret_cast<const char*>(codes + off), _MM_HINT_T0);
    __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
    __m256i a2 = _mm256_setzero_si256(), a3 = _mm256_setzero_si256();
    for (size_t p = 0; p < lut.npairs; ++p) {
      const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + p * 32));
      const __m256i t = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(table + p * 32));
      const __m256i r0 = _mm256_shuffle_epi8(t, _mm256_and_si256(c, low4));
      const __m256i r1 = _mm256_shuffle_epi8(t, _mm256_and_si256(_mm256_srli_epi16(c, 4), low4));
      a0 = _mm256_add_epi16(a0, r0);
      a1 = _mm256_add_epi16(a1, _mm256_srli_epi16(r0, 8));
      a2 = _mm256_add_epi16(a2, r1);
      a3 = _mm256_add_epi16(a3, _mm256_srli_epi16(r1, 8));
    }
    a0 = _mm256_sub_epi16(a0, _mm256_slli_epi16(a1, 8));  // vectors 0..7 (per lane)
    a2 = _mm256_sub_epi16(a2, _mm256_slli_epi16(a3, 8));  // vectors 16..23; a1: 8..15, a3: 24..31
    const __m256i d01 = _mm256_add_epi16(_mm256_permute2x128_si256(a0, a1, 0x20),
                                         _mm256_permute2x128_si256(a0, a1, 0x31));  // vectors 0..15
    const __m256i d23 = _mm256_add_epi16(_mm256_permute2x128_si256(a2, a3, 0x20),
                                         _mm256_permute2x128_si256(a2, a3, 0x31));  // vectors 16..31
    const __m256i lo = _mm256_set1_epi16(static_cast<int16_t>(floor()));
    const __m256i pass01 = _mm256_cmpeq_epi16(_mm256_max_epu16(d01, lo), d01);  // 0xffff where acc >= lo
    const __m256i pass23 = _mm256_cmpeq_epi16(_mm256_max_epu16(d23, lo), d23);
    // One byte per vector: packs interleaves the lanes (0..7, 16..23, 8..15, 24..31); the permute restores order.
    uint64_t pass = static_cast<uint32_t>(
        _mm256_movemask_epi8(_mm256_permute4x64_epi64(_mm256_packs_epi16(pass01, pass23), 0xD8)));
    if (pass == 0) continue;
    alignas(32) uint16_t acc[kPq4BlockVectors];
    _mm256_store_si256(reinterpret_cast<__m256i*>(acc), d01);
    _mm256_store_si256(reinterpret_cast<__m256i*>(acc + 16), d23);
    const size_t m = std::min(kPq4BlockVectors, n - b0);
    if (m < kPq4BlockVectors) pass &= (uint64_t(1) << m) - 1;
    while (pass) {
      const int j = __builtin_ctzll(pass);
      pass &= pass - 1;
      hit(b0 + static_cast<size_t>(j), acc[j]);
    }
  }
}
#endif

// Picks the kernel (AVX2 where the CPU has it); force_portable is for the tests that compare the two.
template <class Floor, class Hit>
void pq4_scan_list(const uint8_t* codes, size_t n, const Pq4Lut& lut, Floor&& floor, Hit&& hit,
                   bool force_portable = false) {
#if PATCHIFY_X86
  if (!force_portable && has_avx2()) return pq4_scan_list_avx2(codes, n, lut, floor, hit);
#endif
  (void)force_portable;
  pq4_scan_list_portable(codes, n, lut, floor, hit);
}

}  // namespace detail
}  // namespace patchify
