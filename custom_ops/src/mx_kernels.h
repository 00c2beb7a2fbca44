// Block decode and encode loops for MX tensors, independent of ONNX Runtime.
//
// A tensor of shape [outer, length, inner] is blocked along the middle axis:
// each (outer, inner) line holds ceil(length / block_size) blocks, the last one
// possibly partial. Packed codes have shape [outer, n_blocks * bytes_per_block,
// inner] and scale bytes [outer, n_blocks, inner]; when inner > 1 a block's
// bytes are strided by `inner` in memory.
#pragma once

#include <cstddef>
#include <cstdint>

#include "mx_format.h"

namespace mfqat {

struct BlockGeometry {
  int64_t outer = 1;   // product of the dimensions before the blocked axis
  int64_t length = 0;  // length of the blocked axis
  int64_t inner = 1;   // product of the dimensions after the blocked axis
  int64_t block_size = 32;
  int64_t n_blocks = 0;
  int64_t bytes_per_block = 0;
};

BlockGeometry MakeGeometry(const MXFormat& fmt, int64_t outer, int64_t length, int64_t inner,
                           int64_t block_size);

// Runs fn(context, task) once for every task in [0, n_tasks), possibly in
// parallel; fn must not throw.
class TaskRunner {
 public:
  virtual ~TaskRunner() = default;
  virtual void Run(size_t n_tasks, void (*fn)(void*, size_t), void* context) const = 0;
};

// Runs every task on the calling thread.
class SerialRunner final : public TaskRunner {
 public:
  void Run(size_t n_tasks, void (*fn)(void*, size_t), void* context) const override;
};

// y = decode_table[code] * 2^(scale_byte - 127); blocks with byte 0xFF decode to NaN.
void Dequantize(const MXFormat& fmt, const BlockGeometry& geometry, const uint8_t* codes,
                const uint8_t* scales, float* y, const TaskRunner& runner);

// Block-quantizes x into packed codes and E8M0 scale bytes. Codes of padding
// elements in a partial block, and every code of a NaN/Inf block, are 0.
void Quantize(const MXFormat& fmt, ScaleRule rule, const BlockGeometry& geometry, const float* x,
              uint8_t* codes, uint8_t* scales, const TaskRunner& runner);

// Unbiased shared exponent of a block with largest magnitude bit pattern
// `amax_bits` (finite, sign cleared), clamped to [-127, 127].
int SharedExponent(uint32_t amax_bits, const MXFormat& fmt, ScaleRule rule);

}  // namespace mfqat
