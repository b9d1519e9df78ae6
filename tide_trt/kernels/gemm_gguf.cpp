// y[M, N] = x[M, K] @ W[N, K]^T with x float32 and W held as the GGUF file's own quantized blocks:
//
//   Q4_1: 32 weights per 20-byte block {fp16 d, fp16 m, 16 bytes of 4-bit codes}; weight j (j < 16) is
//         d * (qs[j] & 15) + m, weight j + 16 is d * (qs[j] >> 4) + m.
//   Q8_0: 32 weights per 34-byte block {fp16 d, 32 int8 codes}; weight j is d * qs[j].
//
// Each block is dequantized in registers to float32 (d * q is exact in float32: an 11-bit mantissa times a code of
// at most 8 bits; the single rounding of fma(q, d, m) equals the rounding of (d * q) + m), so the weights this
// kernel multiplies are bit-identical to a float32 dequantization of the file. Products and sums are float32.
//
// Built for small M (decode and speculative verification): each weight row is streamed from memory once per call
// (tiles re-read it from L1 for further activation rows), so verifying γ+1 tokens costs about the memory traffic of
// decoding one, and a decode step reads ~4.5-5 bits per weight instead of bf16's 16.
//
// Batch-invariant by construction: every output element y[m, n] is accumulated in two vector accumulators (lanes
// of the low and high half of each block, blocks in K order), then reduced in a fixed order — whatever M, the tile
// it falls in, or the thread that computes it. The instruction set (AVX-512 or AVX2) is chosen once per process
// from the CPU, so on one machine plain decoding (M = batch) and verification (M = batch * (γ+1)) produce
// bit-identical logits for identical prefixes, which keeps greedy speculative decoding exactly lossless.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kQ41Bytes = 20;
constexpr int64_t kQ80Bytes = 34;

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// ---------------------------------------------------------------------------------------------------------------
// AVX2 + FMA: a block is four 8-lane vectors; accumulator a0 takes vectors 0 and 2, a1 takes 1 and 3.
struct Avx2Q41 {
  static constexpr int64_t kBytes = kQ41Bytes;
  // the block's four weight vectors (w[0..7], w[8..15], w[16..23], w[24..31])
  static inline void dequant(const uint8_t* blk, __m256 out[4]) {
    const __m256 d = _mm256_set1_ps(half_at(blk));
    const __m256 m = _mm256_set1_ps(half_at(blk + 2));
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 4));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(raw, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    out[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), d, m);
    out[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), d, m);
    out[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), d, m);
    out[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), d, m);
  }
};

struct Avx2Q80 {
  static constexpr int64_t kBytes = kQ80Bytes;
  static inline void dequant(const uint8_t* blk, __m256 out[4]) {
    const __m256 d = _mm256_set1_ps(half_at(blk));
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18));
    out[0] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(a)), d);
    out[1] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(a, 8))), d);
    out[2] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), d);
    out[3] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))), d);
  }
};

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
  return _mm_cvtss_f32(s);
}

template <class F, int NW, int MX>
inline void tile_avx2(const float* x, const uint8_t* w, float* y, int64_t m, int64_t n, int64_t N, int64_t K) {
  const int64_t nb = K / kBlock, row_bytes = nb * F::kBytes;
  __m256 a0[NW][MX], a1[NW][MX];
  for (int i = 0; i < NW; ++i)
    for (int j = 0; j < MX; ++j) a0[i][j] = a1[i][j] = _mm256_setzero_ps();
  const uint8_t* wr = w + n * row_bytes;
  const float* xr = x + m * K;
  for (int64_t b = 0; b < nb; ++b) {
    for (int i = 0; i < NW; ++i) {
      __m256 wv[4];
      F::dequant(wr + i * row_bytes + b * F::kBytes, wv);
      for (int j = 0; j < MX; ++j) {
        const float* xb = xr + j * K + b * kBlock;
        a0[i][j] = _mm256_fmadd_ps(wv[0], _mm256_loadu_ps(xb), a0[i][j]);
        a1[i][j] = _mm256_fmadd_ps(wv[1], _mm256_loadu_ps(xb + 8), a1[i][j]);
        a0[i][j] = _mm256_fmadd_ps(wv[2], _mm256_loadu_ps(xb + 16), a0[i][j]);
        a1[i][j] = _mm256_fmadd_ps(wv[3], _mm256_loadu_ps(xb + 24), a1[i][j]);
      }
    }
  }
  for (int j = 0; j < MX; ++j)
    for (int i = 0; i < NW; ++i) y[(m + j) * N + n + i] = hsum256(_mm256_add_ps(a0[i][j], a1[i][j]));
}

// ---------------------------------------------------------------------------------------------------------------
// AVX-512: a block is two 16-lane vectors (low half, high half), each with its own accumulator.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")

struct Avx512Q41 {
  static constexpr int64_t kBytes = kQ41Bytes;
  static inline void dequant(const uint8_t* blk, __m512& lo, __m512& hi) {
    const __m512 d = _mm512_set1_ps(half_at(blk));
    const __m512 m = _mm512_set1_ps(half_at(blk + 2));
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 4)));
    lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(0x0F))), d, m);
    hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), d, m);
  }
};

struct Avx512Q80 {
  static constexpr int64_t kBytes = kQ80Bytes;
  static inline void dequant(const uint8_t* blk, __m512& lo, __m512& hi) {
    const __m512 d = _mm512_set1_ps(half_at(blk));
    lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2)))), d);
    hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18)))), d);
  }
};

inline float hsum512(__m512 v) {
  // fixed order: 16 -> 8 -> 4 -> 2 -> 1 lanes
  __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
  return _mm_cvtss_f32(s);
}

template <class F, int NW, int MX>
inline void tile_avx512(const float* x, const uint8_t* w, float* y, int64_t m, int64_t n, int64_t N, int64_t K) {
  const int64_t nb = K / kBlock, row_bytes = nb * F::kBytes;
  __m512 a0[NW][MX], a1[NW][MX];
  for (int i = 0; i < NW; ++i)
    for (int j = 0; j < MX; ++j) a0[i][j] = a1[i][j] = _mm512_setzero_ps();
  const uint8_t* wr = w + n * row_bytes;
  const float* xr = x + m * K;
  for (int64_t b = 0; b < nb; ++b) {
    __m512 lo[NW], hi[NW];
    for (int i = 0; i < NW; ++i) F::dequant(wr + i * row_bytes + b * F::kBytes, lo[i], hi[i]);
    for (int j = 0; j < MX; ++j) {
      const float* xb = xr + j * K + b * kBlock;
      const __m512 xl = _mm512_loadu_ps(xb), xh = _mm512_loadu_ps(xb + 16);
      for (int i = 0; i < NW; ++i) {
        a0[i][j] = _mm512_fmadd_ps(lo[i], xl, a0[i][j]);
        a1[i][j] = _mm512_fmadd_ps(hi[i], xh, a1[i][j]);
      }
    }
  }
  for (int j = 0; j < MX; ++j)
    for (int i = 0; i < NW; ++i) y[(m + j) * N + n + i] = hsum512(_mm512_add_ps(a0[i][j], a1[i][j]));
}

#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------------------------
// Tiling: weight rows in groups of NW, activation rows in groups of MX. The tile shape changes the speed only;
// every output is the same sequence of operations.
struct Avx2Tag {};
struct Avx512Tag {};

template <class F, int NW, int MX>
inline void tile(Avx2Tag, const float* x, const uint8_t* w, float* y, int64_t m, int64_t n, int64_t N, int64_t K) {
  tile_avx2<F, NW, MX>(x, w, y, m, n, N, K);
}

template <class F, int NW, int MX>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")))
inline void tile(Avx512Tag, const float* x, const uint8_t* w, float* y, int64_t m, int64_t n, int64_t N, int64_t K) {
  tile_avx512<F, NW, MX>(x, w, y, m, n, N, K);
}

// AVX2 has 16 vector registers: 2 x 2 tiles (8 accumulators) for M > 1, 4 x 1 for single rows.
// AVX-512 has 32: 2 x 4 tiles (16 accumulators) for M > 1, 4 x 1 for single rows.
template <class Isa> struct Shape;
template <> struct Shape<Avx2Tag> { static constexpr int kRowsX = 2; };
template <> struct Shape<Avx512Tag> { static constexpr int kRowsX = 4; };

template <class Isa, class F, int NW>
inline void column_block(const float* x, const uint8_t* w, float* y, int64_t M, int64_t n, int64_t N, int64_t K) {
  constexpr int MX = Shape<Isa>::kRowsX;
  int64_t m = 0;
  for (; m + MX <= M; m += MX) tile<F, NW, MX>(Isa{}, x, w, y, m, n, N, K);
  switch (M - m) {
    case 3: tile<F, NW, 3>(Isa{}, x, w, y, m, n, N, K); break;
    case 2: tile<F, NW, 2>(Isa{}, x, w, y, m, n, N, K); break;
    case 1: tile<F, NW, 1>(Isa{}, x, w, y, m, n, N, K); break;
    default: break;
  }
}

template <class Isa, class F, int NW>
inline void dispatch_rows(const float* x, const uint8_t* w, float* y, int64_t M, int64_t n, int64_t rows, int64_t N,
                          int64_t K) {
  // `rows` weight rows starting at n, at most NW
  if constexpr (NW == 4) {
    switch (rows) {
      case 4: column_block<Isa, F, 4>(x, w, y, M, n, N, K); break;
      case 3: column_block<Isa, F, 3>(x, w, y, M, n, N, K); break;
      case 2: column_block<Isa, F, 2>(x, w, y, M, n, N, K); break;
      default: column_block<Isa, F, 1>(x, w, y, M, n, N, K); break;
    }
  } else {
    if (rows == 2) column_block<Isa, F, 2>(x, w, y, M, n, N, K);
    else column_block<Isa, F, 1>(x, w, y, M, n, N, K);
  }
}

template <class Isa, class F>
void run(const float* x, const uint8_t* w, float* y, int64_t M, int64_t N, int64_t K) {
  if (M == 1) {  // decode at bs 1: more weight rows per tile keep enough independent FMA chains in flight
    constexpr int64_t kRowsW = 4;
    const int64_t blocks = (N + kRowsW - 1) / kRowsW;
    at::parallel_for(0, blocks, 8, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t n = b * kRowsW;
        dispatch_rows<Isa, F, 4>(x, w, y, M, n, std::min(kRowsW, N - n), N, K);
      }
    });
    return;
  }
  constexpr int64_t kRowsW = 2;
  const int64_t blocks = (N + kRowsW - 1) / kRowsW;
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n = b * kRowsW;
      dispatch_rows<Isa, F, 2>(x, w, y, M, n, std::min(kRowsW, N - n), N, K);
    }
  });
}

bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
}

torch::Tensor linear_blocks(const torch::Tensor& x, const torch::Tensor& w, int64_t K, int64_t block_bytes,
                            bool allow_avx512, bool q41, const char* name) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, name, ": x [M, K] and blocks [N, K/32*bytes]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && w.scalar_type() == torch::kUInt8,
              name, ": x float32, blocks uint8");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), name, ": contiguous inputs");
  TORCH_CHECK(K % kBlock == 0 && x.size(1) == K, name, ": K must match x and be a multiple of 32");
  TORCH_CHECK(w.size(1) == K / kBlock * block_bytes, name, ": blocks row must hold K/32 blocks of ", block_bytes,
              " bytes");
  const int64_t M = x.size(0), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  if (M == 0 || N == 0) return y;
  if (allow_avx512 && cpu_has_avx512()) {
    if (q41) run<Avx512Tag, Avx512Q41>(xp, wp, yp, M, N, K);
    else run<Avx512Tag, Avx512Q80>(xp, wp, yp, M, N, K);
  } else {
    if (q41) run<Avx2Tag, Avx2Q41>(xp, wp, yp, M, N, K);
    else run<Avx2Tag, Avx2Q80>(xp, wp, yp, M, N, K);
  }
  return y;
}

}  // namespace

torch::Tensor linear_q4_1(const torch::Tensor& x, const torch::Tensor& w, int64_t K, bool allow_avx512) {
  return linear_blocks(x, w, K, kQ41Bytes, allow_avx512, true, "linear_q4_1");
}

torch::Tensor linear_q8_0(const torch::Tensor& x, const torch::Tensor& w, int64_t K, bool allow_avx512) {
  return linear_blocks(x, w, K, kQ80Bytes, allow_avx512, false, "linear_q8_0");
}

std::string isa() { return cpu_has_avx512() ? "avx512" : "avx2"; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_q4_1", &linear_q4_1, "x[M,K] fp32 @ Q4_1 blocks[N, K/32*20]^T -> fp32, batch-invariant",
        py::arg("x"), py::arg("w"), py::arg("k"), py::arg("allow_avx512") = true);
  m.def("linear_q8_0", &linear_q8_0, "x[M,K] fp32 @ Q8_0 blocks[N, K/32*34]^T -> fp32, batch-invariant",
        py::arg("x"), py::arg("w"), py::arg("k"), py::arg("allow_avx512") = true);
  m.def("isa", &isa, "the instruction set the kernels use on this CPU: avx512 or avx2");
}
