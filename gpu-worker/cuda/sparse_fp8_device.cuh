// Device helpers of the FP8 index shared by its scoring kernel
// (sparse_fp8_kernels.cu) and the fused scoring + Top-K
// (sparse_kernels.cu, LaunchScoreFp8TopK): one definition of the
// arithmetic, so both give bit-identical scores.
#pragma once

#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

namespace tailorkv::cuda {

// FP8 E4M3 code -> bf16 bits (low 16), exact (runtime/fp8_reference.cc's).
__device__ __forceinline__ uint32_t Fp8ToBf16(uint32_t b) {
  const uint32_t sign = (b & 0x80u) << 8;
  const uint32_t mag = b & 0x7Fu;
  uint32_t r;
  if (mag == 0x7Fu) {
    r = 0x7FC0u;
  } else if (mag >= 8u) {
    r = (mag << 4) + (120u << 7);  // re-bias 7 -> 127; the mantissa's 3 bits on top
  } else {
    // m * 2^-9: a normal float (or 0), exact, with the low 16 bits zero.
    r = __float_as_uint(__fmul_rn(__uint2float_rn(mag), 0.001953125f)) >> 16;
  }
  return sign | r;
}

// The score of one index row of d = 16 * kChunks FP8 codes (16-byte
// aligned) against q (d floats, shared memory): a sum over the channels in
// order, each product and sum rounded to nearest (ScoreIndexKernel's order).
template <int kChunks>
__device__ __forceinline__ float Fp8IndexDot(const float* q, const uint4* __restrict__ r16) {
  uint4 v[kChunks];
#pragma unroll
  for (int u = 0; u < kChunks; ++u) v[u] = __ldg(&r16[u]);
  float dot = 0.0f;
#pragma unroll
  for (int u = 0; u < kChunks; ++u) {
    const uint32_t w[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
      // The hardware's E4M3 -> f16 conversion, two codes an instruction:
      // every E4M3 value is exact in f16 and f32, so the products are the
      // same as through Fp8ToBf16 (the software decode took ~2/3 of the
      // scoring's time: 1 TB/s at 128k, H100); only a NaN code's payload
      // may differ.
      float f[4];
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        const __half2_raw h2 = __nv_cvt_fp8x2_to_halfraw2(
            static_cast<__nv_fp8x2_storage_t>((w[e] >> (16 * p)) & 0xFFFFu), __NV_E4M3);
        const float2 f2 = __half22float2(__half2(h2));
        f[2 * p] = f2.x;
        f[2 * p + 1] = f2.y;
      }
#pragma unroll
      for (int b = 0; b < 4; ++b) dot = __fadd_rn(dot, __fmul_rn(q[16 * u + 4 * e + b], f[b]));
#else
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const float x = __uint_as_float(Fp8ToBf16((w[e] >> (8 * b)) & 0xFFu) << 16);
        dot = __fadd_rn(dot, __fmul_rn(q[16 * u + 4 * e + b], x));
      }
#endif
    }
  }
  return dot;
}

}  // namespace tailorkv::cuda
