#include "mx_format.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

namespace mfqat {
namespace {

// Special-value layout of a small float, as in ml_dtypes: E5M2 reserves the
// top exponent for Inf/NaN like IEEE, E4M3 ("fn") only the all-ones code for
// NaN, and the FP6/FP4 formats have no special codes.
enum class Specials { kNone, kIeee, kNanOnly };

MXFormat MakeFloat(const char* name, int ebits, int mbits, Specials specials) {
  MXFormat f;
  f.name = name;
  f.is_float = true;
  f.bits = 1 + ebits + mbits;
  f.ebits = ebits;
  f.mbits = mbits;
  const int bias = (1 << (ebits - 1)) - 1;
  const int top_exp = (1 << ebits) - 1;
  const int top_mantissa = (1 << mbits) - 1;
  const int max_mantissa = specials == Specials::kNanOnly ? top_mantissa - 1 : top_mantissa;
  f.emax_elem = (specials == Specials::kIeee ? top_exp - 1 : top_exp) - bias;
  f.max_normal = std::ldexp(1.0f + static_cast<float>(max_mantissa) / (1 << mbits), f.emax_elem);
  f.enc_e_lo = 1 - bias;
  f.enc_e_hi = f.emax_elem;

  const float quiet_nan = std::numeric_limits<float>::quiet_NaN();
  for (int code = 0; code < (1 << f.bits); ++code) {
    const bool negative = (code >> (f.bits - 1)) & 1;
    const int exp_field = (code >> mbits) & top_exp;
    const int mantissa = code & top_mantissa;
    float magnitude;
    if (exp_field == 0) {
      magnitude = std::ldexp(static_cast<float>(mantissa), f.enc_e_lo - mbits);
    } else {
      magnitude = std::ldexp(static_cast<float>((1 << mbits) + mantissa), exp_field - bias - mbits);
    }
    if (specials == Specials::kIeee && exp_field == top_exp) {
      magnitude = mantissa == 0 ? std::numeric_limits<float>::infinity() : quiet_nan;
    }
    if (specials == Specials::kNanOnly && exp_field == top_exp && mantissa == top_mantissa) {
      magnitude = quiet_nan;
    }
    f.decode_table[code] = negative ? -magnitude : magnitude;
  }
  return f;
}

MXFormat MakeInt(int bits) {
  MXFormat f;
  f.name = "mxint" + std::to_string(bits);
  f.is_float = false;
  f.bits = bits;
  f.mbits = bits - 2;
  f.emax_elem = 0;
  const int max_code = (1 << (bits - 1)) - 1;
  f.max_normal = std::ldexp(static_cast<float>(max_code), -f.mbits);
  f.enc_e_lo = 0;
  f.enc_e_hi = 0;
  for (int code = 0; code < (1 << bits); ++code) {
    // Sign-extend the low `bits` bits; the unused most negative code decodes
    // like any two's complement value.
    const int k = code >= (1 << (bits - 1)) ? code - (1 << bits) : code;
    f.decode_table[code] = std::ldexp(static_cast<float>(k), -f.mbits);
  }
  return f;
}

const std::vector<MXFormat>& AllFormats() {
  static const std::vector<MXFormat> formats = [] {
    std::vector<MXFormat> list;
    list.push_back(MakeFloat("mxfp8_e4m3", 4, 3, Specials::kNanOnly));
    list.push_back(MakeFloat("mxfp8_e5m2", 5, 2, Specials::kIeee));
    list.push_back(MakeFloat("mxfp6_e3m2", 3, 2, Specials::kNone));
    list.push_back(MakeFloat("mxfp6_e2m3", 2, 3, Specials::kNone));
    list.push_back(MakeFloat("mxfp4_e2m1", 2, 1, Specials::kNone));
    for (int bits = 8; bits >= 2; --bits) list.push_back(MakeInt(bits));
    return list;
  }();
  return formats;
}

std::string Normalize(const std::string& text) {
  const auto begin = text.find_first_not_of(" \t");
  if (begin == std::string::npos) return "";
  const auto end = text.find_last_not_of(" \t");
  std::string out = text.substr(begin, end - begin + 1);
  std::transform(out.begin(), out.end(), out.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return out;
}

}  // namespace

const MXFormat& GetFormat(const std::string& name) {
  std::string key = Normalize(name);
  if (key == "mxfp8") key = "mxfp8_e4m3";
  if (key == "mxfp6") key = "mxfp6_e2m3";
  if (key == "mxfp4") key = "mxfp4_e2m1";
  std::string valid;
  for (const MXFormat& f : AllFormats()) {
    if (f.name == key) return f;
    valid += (valid.empty() ? "" : ", ") + f.name;
  }
  throw std::invalid_argument("unknown MX format '" + name + "'; valid formats are " + valid +
                              " and the aliases mxfp8, mxfp6, mxfp4");
}

ScaleRule ParseScaleRule(const std::string& name) {
  const std::string key = Normalize(name);
  if (key == "floor") return ScaleRule::kFloor;
  if (key == "rceil") return ScaleRule::kRceil;
  if (key == "even") return ScaleRule::kEven;
  throw std::invalid_argument("unknown scale_rule '" + name + "'; expected floor, rceil or even");
}

int64_t BytesPerBlock(const MXFormat& fmt, int64_t block_size) {
  return (block_size * fmt.bits + 7) / 8;
}

}  // namespace mfqat
