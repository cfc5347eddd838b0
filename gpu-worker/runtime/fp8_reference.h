// FP8 E4M3 (OCP "e4m3fn") conversions: the CPU reference for the FP8 host
// tier (cuda/sparse_fp8_kernels.cuh reproduces these bit for bit).
//
// Format: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits. Exponent
// field 0 is subnormal (m * 2^-9); no infinities; 0x7F / 0xFF (exponent and
// mantissa all ones) are NaN, so the largest finite magnitude is 0x7E = 448.
//
// Encoding (float -> fp8), per value, no scale:
//   round to nearest, ties to even, on the exact float value (subnormal
//   results included: 0.5 * 2^-9 -> 0, 1.5 * 2^-9 -> 0x02);
//   |x| >= 448 (finite or infinite) saturates to +-448 (0x7E / 0xFE);
//   NaN -> 0x7F with the input's sign bit (0xFF for a negative NaN);
//   -0.0 and negative values that round to zero -> 0x80.
// Decoding (fp8 -> float) is exact; NaN codes decode to the quiet NaN
// 0x7FC00000 with the code's sign. Every fp8 value is exactly a bf16 value
// (Fp8E4M3ToBf16Bits), so fp8 -> bf16 loses nothing.
#pragma once

#include <cstdint>

namespace tailorkv::runtime {

uint8_t FloatToFp8E4M3(float x);
float Fp8E4M3ToFloat(uint8_t b);

// The same through bf16 bit patterns (the tier's device format): bf16 ->
// float is exact, so Bf16BitsToFp8E4M3(b) == FloatToFp8E4M3(float(b)); a
// NaN code decodes to 0x7FC0 / 0xFFC0.
uint8_t Bf16BitsToFp8E4M3(uint16_t bf16_bits);
uint16_t Fp8E4M3ToBf16Bits(uint8_t b);

}  // namespace tailorkv::runtime
