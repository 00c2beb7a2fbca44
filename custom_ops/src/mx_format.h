// MX element formats and shared-exponent rules (OCP Microscaling v1.0).
//
// A block of `block_size` elements shares one E8M0 scale byte; the block's
// value i is decode_table[code_i] * 2^(byte - 127), and byte 0xFF makes the
// whole block NaN. Small floats are sign-magnitude with `ebits` exponent bits
// of bias 2^(ebits-1) - 1 and `mbits` stored mantissa bits; integers are two's
// complement k with value k * 2^-(bits-2) and |k| <= 2^(bits-1) - 1.
//
// The description is derived from the element layout only, never from a
// per-name branch, and must match mfqat_onnx/formats.py: the tests compare
// every decoded code of every format with the Python reference.
#pragma once

#include <array>
#include <cstdint>
#include <string>

namespace mfqat {

enum class ScaleRule { kFloor, kRceil, kEven };

struct MXFormat {
  std::string name;
  bool is_float = false;
  int bits = 0;      // bits per element code, sign included
  int ebits = 0;     // exponent bits, 0 for integers
  int mbits = 0;     // stored mantissa bits; fraction bits (bits - 2) for integers
  int emax_elem = 0; // exponent of the largest power of two an element represents
  float max_normal = 0.0f;

  // Encoder grid: an element magnitude a is rounded on the quantum
  // 2^(e - mbits) with e = clamp(floor(log2(a)), enc_e_lo, enc_e_hi).
  // Floats use [1 - bias, emax_elem]; integers have one fixed quantum, so
  // both bounds are 0.
  int enc_e_lo = 0;
  int enc_e_hi = 0;

  // Value of every code at scale 1 (entries past 2^bits stay 0).
  std::array<float, 256> decode_table{};
};

// Looks up a canonical format id or alias, case-insensitively.
// Throws std::invalid_argument naming the valid ids.
const MXFormat& GetFormat(const std::string& name);

// Parses "floor", "rceil" or "even"; throws std::invalid_argument otherwise.
ScaleRule ParseScaleRule(const std::string& name);

// Bytes one block of packed codes takes: ceil(block_size * bits / 8).
int64_t BytesPerBlock(const MXFormat& fmt, int64_t block_size);

}  // namespace mfqat
