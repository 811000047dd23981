// ADC inner-loop variants for 8-bit PQ codes (M = 48), timed on random codes and tables: what the fused IVFPQ
// scanner's per-code cost could be with other kernels. Not part of the build; compile and run by hand:
//
//   g++ -O3 -march=x86-64 -o /tmp/adc_kernels benchmarks/experiments/adc_kernels.cpp && /tmp/adc_kernels 100000
//
// v0 is the scanner's kernel (scalar lookups, four codes interleaved); v1 loads code bytes eight at a time; v2
// uses AVX2 gathers (eight sub-quantisers of one code per gather); v3/v4 use a uint16-quantised table (would
// need an exact re-score of the codes near the threshold). Results and conclusions: benchmarks/RESULTS.md.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>
#include <immintrin.h>
using namespace std;
const int M = 48;
static float sink;  // keeps the results alive
// Scalar lookups, four codes interleaved; Table = float (the scanner's kernel) or uint16_t (quantised table,
// integer sums in Acc).
template <class Table, class Acc>
__attribute__((noinline)) float scalar_x4(const uint8_t* codes, size_t n, const Table* table, float* out) {
  for (size_t j = 0; j + 4 <= n; j += 4) {
    const uint8_t* c0 = codes + j * M; const uint8_t* c1 = c0 + M; const uint8_t* c2 = c1 + M; const uint8_t* c3 = c2 + M;
    Acc s0 = 0, s1 = 0, s2 = 0, s3 = 0; const Table* t = table;
    for (int m = 0; m < M; ++m, t += 256) { s0 += t[c0[m]]; s1 += t[c1[m]]; s2 += t[c2[m]]; s3 += t[c3[m]]; }
    out[j] = s0; out[j+1] = s1; out[j+2] = s2; out[j+3] = s3;
  }
  return out[0];
}
// Code bytes loaded eight at a time and taken apart with shifts, two codes interleaved.
template <class Table, class Acc>
__attribute__((noinline)) float qword_x2(const uint8_t* codes, size_t n, const Table* table, float* out) {
  for (size_t j = 0; j + 2 <= n; j += 2) {
    const uint8_t* c0 = codes + j * M; const uint8_t* c1 = c0 + M;
    Acc a0 = 0, a1 = 0, b0 = 0, b1 = 0;
    const Table* t = table;
    for (int m = 0; m < M; m += 8, t += 2048) {
      uint64_t w0, w1; memcpy(&w0, c0 + m, 8); memcpy(&w1, c1 + m, 8);
      a0 += t[w0 & 255]; b0 += t[w1 & 255];
      a1 += t[256 + ((w0 >> 8) & 255)]; b1 += t[256 + ((w1 >> 8) & 255)];
      a0 += t[512 + ((w0 >> 16) & 255)]; b0 += t[512 + ((w1 >> 16) & 255)];
      a1 += t[768 + ((w0 >> 24) & 255)]; b1 += t[768 + ((w1 >> 24) & 255)];
      a0 += t[1024 + ((w0 >> 32) & 255)]; b0 += t[1024 + ((w1 >> 32) & 255)];
      a1 += t[1280 + ((w0 >> 40) & 255)]; b1 += t[1280 + ((w1 >> 40) & 255)];
      a0 += t[1536 + ((w0 >> 48) & 255)]; b0 += t[1536 + ((w1 >> 48) & 255)];
      a1 += t[1792 + (w0 >> 56)]; b1 += t[1792 + (w1 >> 56)];
    }
    out[j] = a0 + a1; out[j+1] = b0 + b1;
  }
  return out[0];
}
// AVX2 gather: 8 subquantizers of one code per gather
__attribute__((target("avx2,fma"), noinline)) float gather_x2(const uint8_t* codes, size_t n, const float* table, float* out) {
  const __m256i base = _mm256_setr_epi32(0, 256, 512, 768, 1024, 1280, 1536, 1792);
  for (size_t j = 0; j + 2 <= n; j += 2) {
    const uint8_t* c0 = codes + j * M; const uint8_t* c1 = c0 + M;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (int m = 0; m < M; m += 8) {
      __m256i i0 = _mm256_add_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(c0 + m))), base);
      __m256i i1 = _mm256_add_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(c1 + m))), base);
      a0 = _mm256_add_ps(a0, _mm256_i32gather_ps(table + m * 256, i0, 4));
      a1 = _mm256_add_ps(a1, _mm256_i32gather_ps(table + m * 256, i1, 4));
    }
    float t0[8], t1[8]; _mm256_storeu_ps(t0, a0); _mm256_storeu_ps(t1, a1);
    out[j] = t0[0]+t0[1]+t0[2]+t0[3]+t0[4]+t0[5]+t0[6]+t0[7];
    out[j+1] = t1[0]+t1[1]+t1[2]+t1[3]+t1[4]+t1[5]+t1[6]+t1[7];
  }
  return out[0];
}
int main(int argc, char** argv) {
  size_t n = argc > 1 ? atol(argv[1]) : 100000;
  mt19937 rng(1);
  vector<uint8_t> codes(n * M); for (auto& c : codes) c = rng() & 255;
  vector<float> table(M * 256); for (auto& t : table) t = (rng() % 10000) / 1e4f;
  vector<uint16_t> t16(M * 256); for (size_t i = 0; i < t16.size(); ++i) t16[i] = uint16_t(table[i] * 1000);
  vector<float> out(n);
  auto bench = [&](const char* name, auto f) {
    double best = 1e9;
    for (int r = 0; r < 20; ++r) {
      auto t0 = chrono::steady_clock::now(); sink += f();
      double dt = chrono::duration<double>(chrono::steady_clock::now() - t0).count();
      best = min(best, dt);
    }
    printf("%s: %.2f ns/code\n", name, best / n * 1e9);
  };
  bench("v0 scalar x4", [&] { return scalar_x4<float, float>(codes.data(), n, table.data(), out.data()); });
  bench("v1 qword x2", [&] { return qword_x2<float, float>(codes.data(), n, table.data(), out.data()); });
  bench("v2 gather x2", [&] { return gather_x2(codes.data(), n, table.data(), out.data()); });
  bench("v3 u16 x4", [&] { return scalar_x4<uint16_t, uint32_t>(codes.data(), n, t16.data(), out.data()); });
  bench("v4 u16 qword x2", [&] { return qword_x2<uint16_t, uint32_t>(codes.data(), n, t16.data(), out.data()); });
}
