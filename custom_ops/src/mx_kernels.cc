// Decode and encode loops. The hot loops run without per-element branches:
// codes are read in groups of G = 8 / gcd(bits, 8) elements, which fill a whole
// number of bytes (G * bits / 8 <= 7) because every block starts on a byte,
// and each element is decoded by a table lookup and one multiplication.
#include "mx_kernels.h"

#include <algorithm>
#include <cstring>
#include <limits>

namespace mfqat {
namespace {

constexpr uint32_t kAbsMask = 0x7FFFFFFFu;
constexpr uint32_t kInfBits = 0x7F800000u;
constexpr uint8_t kNanScale = 0xFF;
constexpr int kMinSharedExp = -127;
constexpr int kMaxSharedExp = 127;

// Elements per task before the work is split across threads.
constexpr int64_t kTaskElements = 1 << 16;
// Columns handled together when blocks are strided (axis not last); sized so
// the per-column scratch arrays stay on the stack.
constexpr int64_t kColumnChunk = 512;
// Elements encoded per pass before packing; a multiple of every group size (8).
constexpr int64_t kEncodeChunk = 256;

inline uint32_t FloatBits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits;
}

inline float BitsFloat(uint32_t bits) {
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// 2^exponent for exponent in [-127, 127], built from the float32 bit layout:
// 2^-127 is the subnormal 0x00400000, the rest go into the exponent field.
inline float Pow2(int exponent) {
  return exponent == kMinSharedExp ? BitsFloat(0x00400000u)
                                   : BitsFloat(static_cast<uint32_t>(exponent + 127) << 23);
}

// Value of an E8M0 byte; 0xFF is NaN.
inline float ScaleValue(uint8_t byte) {
  return byte == kNanScale ? std::numeric_limits<float>::quiet_NaN() : Pow2(int(byte) - 127);
}

constexpr int Gcd(int a, int b) { return b == 0 ? a : Gcd(b, a % b); }

template <int kBits>
struct Packing {
  static constexpr int kGroup = 8 / Gcd(kBits, 8);        // elements per byte-aligned group
  static constexpr int kGroupBytes = kGroup * kBits / 8;  // bytes per group, at most 7
  static constexpr uint32_t kMask = (1u << kBits) - 1;
};

// Reads n <= 8 bytes, `stride` apart, as a little-endian word.
template <int kBytes>
inline uint64_t LoadWord(const uint8_t* src, int64_t stride) {
  uint64_t word = 0;
  for (int k = 0; k < kBytes; ++k) word |= uint64_t(src[k * stride]) << (8 * k);
  return word;
}

inline uint64_t LoadPartialWord(const uint8_t* src, int64_t stride, int64_t n_bytes) {
  uint64_t word = 0;
  for (int64_t k = 0; k < n_bytes; ++k) word |= uint64_t(src[k * stride]) << (8 * k);
  return word;
}

template <int kBytes>
inline void StoreWord(uint8_t* dst, int64_t stride, uint64_t word) {
  for (int k = 0; k < kBytes; ++k) dst[k * stride] = uint8_t(word >> (8 * k));
}

inline void StorePartialWord(uint8_t* dst, int64_t stride, int64_t n_bytes, uint64_t word) {
  for (int64_t k = 0; k < n_bytes; ++k) dst[k * stride] = uint8_t(word >> (8 * k));
}

// Splits [0, outer * n_blocks) x [0, inner) into tasks of about kTaskElements.
struct TaskPlan {
  int64_t block_rows = 0;       // outer * n_blocks
  int64_t rows_per_task = 1;    // block rows per task (1 when columns are split)
  int64_t column_chunks = 1;    // column slices per block row
  int64_t columns_per_chunk = 1;
  int64_t n_tasks = 0;

  TaskPlan(const BlockGeometry& g) {
    block_rows = g.outer * g.n_blocks;
    const int64_t elements_per_row = std::max<int64_t>(1, g.block_size * g.inner);
    if (elements_per_row >= kTaskElements && g.inner > 1) {
      columns_per_chunk = std::max<int64_t>(1, kTaskElements / g.block_size);
      column_chunks = (g.inner + columns_per_chunk - 1) / columns_per_chunk;
    } else {
      rows_per_task = std::max<int64_t>(1, kTaskElements / elements_per_row);
      columns_per_chunk = g.inner;
    }
    n_tasks = ((block_rows + rows_per_task - 1) / rows_per_task) * column_chunks;
  }

  // Block rows [row_begin, row_end) and columns [col_begin, col_end) of one task.
  void Bounds(int64_t task, int64_t inner, int64_t* row_begin, int64_t* row_end, int64_t* col_begin,
              int64_t* col_end) const {
    const int64_t row_task = task / column_chunks;
    const int64_t chunk = task % column_chunks;
    *row_begin = row_task * rows_per_task;
    *row_end = std::min(block_rows, *row_begin + rows_per_task);
    *col_begin = chunk * columns_per_chunk;
    *col_end = std::min(inner, *col_begin + columns_per_chunk);
  }
};

template <typename Job>
void RunTasks(const Job& job, const TaskPlan& plan, const TaskRunner& runner) {
  if (plan.n_tasks == 0) return;
  auto fn = [](void* context, size_t task) noexcept { static_cast<const Job*>(context)->RunTask(task); };
  if (plan.n_tasks == 1) {
    fn(const_cast<Job*>(&job), 0);
    return;
  }
  runner.Run(static_cast<size_t>(plan.n_tasks), fn, const_cast<Job*>(&job));
}

// ---------------------------------------------------------------------------
// Dequantize

struct DequantizeJob {
  const MXFormat* fmt;
  BlockGeometry g;
  TaskPlan plan;
  const uint8_t* codes;
  const uint8_t* scales;
  float* y;
  void (*run_rows)(const DequantizeJob&, int64_t, int64_t, int64_t, int64_t);

  void RunTask(size_t task) const {
    int64_t r0, r1, c0, c1;
    plan.Bounds(static_cast<int64_t>(task), g.inner, &r0, &r1, &c0, &c1);
    run_rows(*this, r0, r1, c0, c1);
  }
};

// Blocks contiguous in memory (inner == 1).
template <int kBits>
void DequantizeContiguous(const DequantizeJob& job, int64_t r0, int64_t r1, int64_t, int64_t) {
  using P = Packing<kBits>;
  const BlockGeometry& g = job.g;
  const float* table = job.fmt->decode_table.data();
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t o = row / g.n_blocks;
    const int64_t b = row % g.n_blocks;
    const int64_t n = std::min(g.block_size, g.length - b * g.block_size);
    const uint8_t* src = job.codes + row * g.bytes_per_block;
    float* dst = job.y + o * g.length + b * g.block_size;
    const uint8_t byte = job.scales[row];
    if (byte == kNanScale) {
      std::fill(dst, dst + n, std::numeric_limits<float>::quiet_NaN());
      continue;
    }
    const float scale = ScaleValue(byte);

    const int64_t n_groups = n / P::kGroup;
    for (int64_t grp = 0; grp < n_groups; ++grp) {
      const uint64_t word = LoadWord<P::kGroupBytes>(src + grp * P::kGroupBytes, 1);
      float* out = dst + grp * P::kGroup;
      for (int e = 0; e < P::kGroup; ++e) out[e] = table[(word >> (e * kBits)) & P::kMask] * scale;
    }

    const int64_t tail = n - n_groups * P::kGroup;
    if (tail > 0) {
      const uint64_t word = LoadPartialWord(src + n_groups * P::kGroupBytes, 1, (tail * kBits + 7) / 8);
      float* out = dst + n_groups * P::kGroup;
      for (int64_t e = 0; e < tail; ++e) out[e] = table[(word >> (e * kBits)) & P::kMask] * scale;
    }
  }
}

// MXINT8 codes are int8 values times 2^-6, so a widening conversion replaces
// the table lookup and vectorizes; the product is exact either way.
void DequantizeInt8Contiguous(const DequantizeJob& job, int64_t r0, int64_t r1, int64_t, int64_t) {
  const BlockGeometry& g = job.g;
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t o = row / g.n_blocks;
    const int64_t b = row % g.n_blocks;
    const int64_t n = std::min(g.block_size, g.length - b * g.block_size);
    const int8_t* src = reinterpret_cast<const int8_t*>(job.codes + row * g.bytes_per_block);
    float* dst = job.y + o * g.length + b * g.block_size;
    const uint8_t byte = job.scales[row];
    if (byte == kNanScale) {
      std::fill(dst, dst + n, std::numeric_limits<float>::quiet_NaN());
      continue;
    }
    // 2^(byte-127) * 2^-6 is a power of two at or above 2^-133, so it is exact.
    const float scale = ScaleValue(byte) * (1.0f / 64.0f);
    for (int64_t e = 0; e < n; ++e) dst[e] = static_cast<float>(src[e]) * scale;
  }
}

// Blocks strided by `inner` (axis not last): columns are the inner loop.
template <int kBits>
void DequantizeStrided(const DequantizeJob& job, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  using P = Packing<kBits>;
  const BlockGeometry& g = job.g;
  const int64_t inner = g.inner;
  const float* table = job.fmt->decode_table.data();
  float scale[kColumnChunk];
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t o = row / g.n_blocks;
    const int64_t b = row % g.n_blocks;
    const int64_t n = std::min(g.block_size, g.length - b * g.block_size);
    const int64_t n_groups = n / P::kGroup;
    const int64_t tail = n - n_groups * P::kGroup;
    const uint8_t* row_codes = job.codes + (o * g.n_blocks * g.bytes_per_block + b * g.bytes_per_block) * inner;
    float* row_y = job.y + (o * g.length + b * g.block_size) * inner;
    const uint8_t* row_scales = job.scales + row * inner;

    for (int64_t cc = c0; cc < c1; cc += kColumnChunk) {
      const int64_t width = std::min(kColumnChunk, c1 - cc);
      for (int64_t i = 0; i < width; ++i) scale[i] = ScaleValue(row_scales[cc + i]);

      for (int64_t grp = 0; grp < n_groups; ++grp) {
        const uint8_t* src = row_codes + grp * P::kGroupBytes * inner + cc;
        float* dst = row_y + grp * P::kGroup * inner + cc;
        for (int64_t i = 0; i < width; ++i) {
          const uint64_t word = LoadWord<P::kGroupBytes>(src + i, inner);
          for (int e = 0; e < P::kGroup; ++e) {
            dst[e * inner + i] = table[(word >> (e * kBits)) & P::kMask] * scale[i];
          }
        }
      }
      if (tail > 0) {
        const int64_t tail_bytes = (tail * kBits + 7) / 8;
        const uint8_t* src = row_codes + n_groups * P::kGroupBytes * inner + cc;
        float* dst = row_y + n_groups * P::kGroup * inner + cc;
        for (int64_t i = 0; i < width; ++i) {
          const uint64_t word = LoadPartialWord(src + i, inner, tail_bytes);
          for (int64_t e = 0; e < tail; ++e) {
            dst[e * inner + i] = table[(word >> (e * kBits)) & P::kMask] * scale[i];
          }
        }
      }

      // NaN blocks decode to the canonical quiet NaN whatever their codes hold.
      for (int64_t i = 0; i < width; ++i) {
        if (row_scales[cc + i] != kNanScale) continue;
        for (int64_t e = 0; e < n; ++e) row_y[e * inner + cc + i] = std::numeric_limits<float>::quiet_NaN();
      }
    }
  }
}

using DequantizeRows = void (*)(const DequantizeJob&, int64_t, int64_t, int64_t, int64_t);

template <int kBits>
DequantizeRows PickDequantize(bool contiguous) {
  return contiguous ? &DequantizeContiguous<kBits> : &DequantizeStrided<kBits>;
}

// ---------------------------------------------------------------------------
// Quantize

struct EncodeParams {
  float max_normal;
  int e_lo;
  int e_hi;
  int mbits;
  int bits;
  uint32_t mask;
};

// Rounds one value at scale 1 to its code: ties to even, saturating, the
// sign of a float code taken from the sign bit. With e the value's binade
// clamped to the grid's range, t = |v| / 2^(e - mbits) is rounded to an
// integer by adding and subtracting 2^23 (exact for 0 <= t < 2^23 under the
// default round-to-nearest-even mode), and the code magnitude is
// (e - e_lo) * 2^mbits + t, which also covers a carry into the next binade
// and the subnormal grid.
template <bool kInteger>
inline uint32_t EncodeElement(float v, const EncodeParams& p) {
  const uint32_t bits = FloatBits(v);
  const uint32_t sign = bits >> 31;
  // Capping before rounding equals rounding then saturating, because
  // max_normal lies on the grid and rounding is monotonic. The argument order
  // maps NaN (only met in NaN blocks, whose codes are zeroed) to max_normal.
  const float magnitude = std::min(p.max_normal, BitsFloat(bits & kAbsMask));
  const int binade = int(FloatBits(magnitude) >> 23) - 127;
  const int e = std::min(std::max(binade, p.e_lo), p.e_hi);
  const float to_steps = BitsFloat(static_cast<uint32_t>(127 + p.mbits - e) << 23);
  const float steps = (magnitude * to_steps + 8388608.0f) - 8388608.0f;
  const uint32_t code_magnitude =
      (static_cast<uint32_t>(e - p.e_lo) << p.mbits) + static_cast<uint32_t>(static_cast<int32_t>(steps));
  if constexpr (kInteger) {
    // Two's complement of the magnitude; -0 becomes code 0.
    return ((code_magnitude ^ (0u - sign)) + sign) & p.mask;
  } else {
    return code_magnitude | (sign << (p.bits - 1));
  }
}

struct QuantizeJob {
  const MXFormat* fmt;
  ScaleRule rule;
  EncodeParams params;
  BlockGeometry g;
  TaskPlan plan;
  const float* x;
  uint8_t* codes;
  uint8_t* scales;
  void (*run_rows)(const QuantizeJob&, int64_t, int64_t, int64_t, int64_t);

  void RunTask(size_t task) const {
    int64_t r0, r1, c0, c1;
    plan.Bounds(static_cast<int64_t>(task), g.inner, &r0, &r1, &c0, &c1);
    run_rows(*this, r0, r1, c0, c1);
  }
};

// Scale byte of a block and the factor 2^-E that brings its elements to scale 1.
inline uint8_t BlockScale(uint32_t amax_bits, const QuantizeJob& job, float* to_unit) {
  if (amax_bits >= kInfBits) {
    *to_unit = 0.0f;
    return kNanScale;
  }
  const int shared_exp = SharedExponent(amax_bits, *job.fmt, job.rule);
  *to_unit = Pow2(-shared_exp);
  return static_cast<uint8_t>(shared_exp + 127);
}

template <int kBits, bool kInteger>
void QuantizeContiguous(const QuantizeJob& job, int64_t r0, int64_t r1, int64_t, int64_t) {
  using P = Packing<kBits>;
  static_assert(kEncodeChunk % P::kGroup == 0, "chunks must hold whole packing groups");
  const BlockGeometry& g = job.g;
  const EncodeParams& p = job.params;
  uint32_t chunk[kEncodeChunk];
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t o = row / g.n_blocks;
    const int64_t b = row % g.n_blocks;
    const int64_t n = std::min(g.block_size, g.length - b * g.block_size);
    const float* src = job.x + o * g.length + b * g.block_size;
    uint8_t* dst = job.codes + row * g.bytes_per_block;

    // Non-negative floats order like their bit patterns, and NaN/Inf patterns
    // sit above every finite one, so one integer max finds both.
    uint32_t amax_bits = 0;
    for (int64_t e = 0; e < n; ++e) amax_bits = std::max(amax_bits, FloatBits(src[e]) & kAbsMask);
    float to_unit;
    job.scales[row] = BlockScale(amax_bits, job, &to_unit);
    if (amax_bits >= kInfBits) {
      std::memset(dst, 0, static_cast<size_t>(g.bytes_per_block));
      continue;
    }

    // Encode a chunk into plain codes first (a loop the compiler vectorizes),
    // then pack it. Chunks hold whole groups, so only the last one has a tail.
    int64_t written = 0;
    for (int64_t start = 0; start < n; start += kEncodeChunk) {
      const int64_t count = std::min(kEncodeChunk, n - start);
      const float* in = src + start;
      for (int64_t e = 0; e < count; ++e) chunk[e] = EncodeElement<kInteger>(in[e] * to_unit, p);

      const int64_t n_groups = count / P::kGroup;
      for (int64_t grp = 0; grp < n_groups; ++grp) {
        const uint32_t* codes = chunk + grp * P::kGroup;
        uint64_t word = 0;
        for (int e = 0; e < P::kGroup; ++e) word |= uint64_t(codes[e]) << (e * kBits);
        StoreWord<P::kGroupBytes>(dst + written + grp * P::kGroupBytes, 1, word);
      }
      written += n_groups * P::kGroupBytes;

      const int64_t tail = count - n_groups * P::kGroup;
      if (tail > 0) {
        const uint32_t* codes = chunk + n_groups * P::kGroup;
        uint64_t word = 0;
        for (int64_t e = 0; e < tail; ++e) word |= uint64_t(codes[e]) << (e * kBits);
        const int64_t tail_bytes = (tail * kBits + 7) / 8;
        StorePartialWord(dst + written, 1, tail_bytes, word);
        written += tail_bytes;
      }
    }
    // Padding elements of a partial block are zero codes.
    std::memset(dst + written, 0, static_cast<size_t>(g.bytes_per_block - written));
  }
}

template <int kBits, bool kInteger>
void QuantizeStrided(const QuantizeJob& job, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  using P = Packing<kBits>;
  const BlockGeometry& g = job.g;
  const EncodeParams& p = job.params;
  const int64_t inner = g.inner;
  uint32_t amax_bits[kColumnChunk];
  float to_unit[kColumnChunk];
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t o = row / g.n_blocks;
    const int64_t b = row % g.n_blocks;
    const int64_t n = std::min(g.block_size, g.length - b * g.block_size);
    const int64_t n_groups = n / P::kGroup;
    const int64_t tail = n - n_groups * P::kGroup;
    const float* row_x = job.x + (o * g.length + b * g.block_size) * inner;
    uint8_t* row_codes = job.codes + (o * g.n_blocks * g.bytes_per_block + b * g.bytes_per_block) * inner;
    uint8_t* row_scales = job.scales + row * inner;

    for (int64_t cc = c0; cc < c1; cc += kColumnChunk) {
      const int64_t width = std::min(kColumnChunk, c1 - cc);

      // Largest magnitude and scale of each column's block.
      std::fill(amax_bits, amax_bits + width, 0u);
      for (int64_t e = 0; e < n; ++e) {
        const float* in = row_x + e * inner + cc;
        for (int64_t i = 0; i < width; ++i) amax_bits[i] = std::max(amax_bits[i], FloatBits(in[i]) & kAbsMask);
      }
      for (int64_t i = 0; i < width; ++i) row_scales[cc + i] = BlockScale(amax_bits[i], job, &to_unit[i]);

      // Encode and pack, group by group.
      for (int64_t grp = 0; grp < n_groups; ++grp) {
        const float* in = row_x + grp * P::kGroup * inner + cc;
        uint8_t* out = row_codes + grp * P::kGroupBytes * inner + cc;
        for (int64_t i = 0; i < width; ++i) {
          uint64_t word = 0;
          for (int e = 0; e < P::kGroup; ++e) {
            word |= uint64_t(EncodeElement<kInteger>(in[e * inner + i] * to_unit[i], p)) << (e * kBits);
          }
          StoreWord<P::kGroupBytes>(out + i, inner, word);
        }
      }
      int64_t written = n_groups * P::kGroupBytes;
      if (tail > 0) {
        const int64_t tail_bytes = (tail * kBits + 7) / 8;
        const float* in = row_x + n_groups * P::kGroup * inner + cc;
        uint8_t* out = row_codes + written * inner + cc;
        for (int64_t i = 0; i < width; ++i) {
          uint64_t word = 0;
          for (int64_t e = 0; e < tail; ++e) {
            word |= uint64_t(EncodeElement<kInteger>(in[e * inner + i] * to_unit[i], p)) << (e * kBits);
          }
          StorePartialWord(out + i, inner, tail_bytes, word);
        }
        written += tail_bytes;
      }
      for (int64_t k = written; k < g.bytes_per_block; ++k) {
        std::memset(row_codes + k * inner + cc, 0, static_cast<size_t>(width));
      }

      // NaN/Inf blocks keep zero codes.
      for (int64_t i = 0; i < width; ++i) {
        if (amax_bits[i] < kInfBits) continue;
        for (int64_t k = 0; k < g.bytes_per_block; ++k) row_codes[k * inner + cc + i] = 0;
      }
    }
  }
}

using QuantizeRows = void (*)(const QuantizeJob&, int64_t, int64_t, int64_t, int64_t);

template <int kBits>
QuantizeRows PickQuantize(bool contiguous, bool integer) {
  if (contiguous) return integer ? &QuantizeContiguous<kBits, true> : &QuantizeContiguous<kBits, false>;
  return integer ? &QuantizeStrided<kBits, true> : &QuantizeStrided<kBits, false>;
}

DequantizeRows SelectDequantize(const MXFormat& fmt, bool contiguous) {
  if (contiguous && !fmt.is_float && fmt.bits == 8) return &DequantizeInt8Contiguous;
  switch (fmt.bits) {
    case 2: return PickDequantize<2>(contiguous);
    case 3: return PickDequantize<3>(contiguous);
    case 4: return PickDequantize<4>(contiguous);
    case 5: return PickDequantize<5>(contiguous);
    case 6: return PickDequantize<6>(contiguous);
    case 7: return PickDequantize<7>(contiguous);
    default: return PickDequantize<8>(contiguous);
  }
}

QuantizeRows SelectQuantize(const MXFormat& fmt, bool contiguous) {
  const bool integer = !fmt.is_float;
  switch (fmt.bits) {
    case 2: return PickQuantize<2>(contiguous, integer);
    case 3: return PickQuantize<3>(contiguous, integer);
    case 4: return PickQuantize<4>(contiguous, integer);
    case 5: return PickQuantize<5>(contiguous, integer);
    case 6: return PickQuantize<6>(contiguous, integer);
    case 7: return PickQuantize<7>(contiguous, integer);
    default: return PickQuantize<8>(contiguous, integer);
  }
}

}  // namespace

BlockGeometry MakeGeometry(const MXFormat& fmt, int64_t outer, int64_t length, int64_t inner,
                           int64_t block_size) {
  BlockGeometry g;
  g.outer = outer;
  g.length = length;
  g.inner = inner;
  g.block_size = block_size;
  g.n_blocks = (length + block_size - 1) / block_size;
  g.bytes_per_block = BytesPerBlock(fmt, block_size);
  return g;
}

void SerialRunner::Run(size_t n_tasks, void (*fn)(void*, size_t), void* context) const {
  for (size_t task = 0; task < n_tasks; ++task) fn(context, task);
}

int SharedExponent(uint32_t amax_bits, const MXFormat& fmt, ScaleRule rule) {
  if (amax_bits == 0) return kMinSharedExp;

  // floor(log2(amax)) and the 23 fraction bits of amax normalised to [1, 2);
  // a float32 subnormal is normalised by its leading one.
  int floor_log2 = int(amax_bits >> 23) - 127;
  uint32_t fraction = amax_bits & 0x007FFFFFu;
  if ((amax_bits >> 23) == 0) {
    const int top = 31 - __builtin_clz(fraction);
    floor_log2 = top - 149;
    fraction = (fraction << (23 - top)) & 0x007FFFFFu;
  }

  int shared_exp = 0;
  switch (rule) {
    case ScaleRule::kFloor:
      shared_exp = floor_log2 - fmt.emax_elem;
      break;
    case ScaleRule::kRceil: {
      // Smallest E with amax / 2^E <= max_normal: the binade difference, one
      // more when amax's fraction exceeds max_normal's.
      const uint32_t max_bits = FloatBits(fmt.max_normal);
      const int max_log2 = int(max_bits >> 23) - 127;
      const uint32_t max_fraction = max_bits & 0x007FFFFFu;
      shared_exp = floor_log2 - max_log2 + (fraction > max_fraction ? 1 : 0);
      break;
    }
    case ScaleRule::kEven: {
      // Round the significand 1.fraction to 1 + mbits bits, ties to even; a
      // carry out moves amax to the next binade.
      const int drop = 23 - fmt.mbits;
      const uint32_t significand = fraction | 0x00800000u;
      const uint32_t kept_lsb = (significand >> drop) & 1u;
      const uint32_t rounded = (significand + (1u << (drop - 1)) - 1u + kept_lsb) >> drop;
      const int carry = int(rounded >> (fmt.mbits + 1));
      shared_exp = floor_log2 + carry - fmt.emax_elem;
      break;
    }
  }
  return std::min(std::max(shared_exp, kMinSharedExp), kMaxSharedExp);
}

void Dequantize(const MXFormat& fmt, const BlockGeometry& geometry, const uint8_t* codes,
                const uint8_t* scales, float* y, const TaskRunner& runner) {
  DequantizeJob job{&fmt, geometry, TaskPlan(geometry), codes, scales, y, nullptr};
  job.run_rows = SelectDequantize(fmt, geometry.inner == 1);
  RunTasks(job, job.plan, runner);
}

void Quantize(const MXFormat& fmt, ScaleRule rule, const BlockGeometry& geometry, const float* x,
              uint8_t* codes, uint8_t* scales, const TaskRunner& runner) {
  EncodeParams params{fmt.max_normal, fmt.enc_e_lo, fmt.enc_e_hi, fmt.mbits, fmt.bits, (1u << fmt.bits) - 1u};
  QuantizeJob job{&fmt, rule, params, geometry, TaskPlan(geometry), x, codes, scales, nullptr};
  job.run_rows = SelectQuantize(fmt, geometry.inner == 1);
  RunTasks(job, job.plan, runner);
}

}  // namespace mfqat
