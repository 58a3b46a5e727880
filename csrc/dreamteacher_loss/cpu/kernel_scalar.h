// Scalar types, conversions and a heap buffer for the CPU kernels. Included by kernel_impl.h INSIDE its
// per-instruction-set anonymous namespace (so every build gets its own copy): no includes, no include guard.

// ---------------------------------------------------------------- scalar conversions
inline float bits_to_f32(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
}
inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof(u));
  return u;
}
inline float bf16_to_f32(uint16_t h) { return bits_to_f32(static_cast<uint32_t>(h) << 16); }
inline uint16_t f32_to_bf16(float f) {  // round to nearest even, quiet NaN kept
  const uint32_t u = f32_to_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(f != f ? 0x7FC0u : rounded);
}
// IEEE half <-> float without F16C (branch-free, vectorisable; the FP16 library's formulation).
inline float f16_to_f32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_f32((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t result = sign | (two_w < (1u << 27) ? f32_to_bits(denormalized) : f32_to_bits(normalized));
  return bits_to_f32(result);
}
inline uint16_t f32_to_f16(float f) {
  float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f32_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = bits_to_f32((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

template <typename T>
struct Io;
template <>
struct Io<float> {
  using acc = float;
  static inline float load(float v) { return v; }
  static inline float make(float v) { return v; }
};
template <>
struct Io<double> {
  using acc = double;
  static inline double load(double v) { return v; }
  static inline double make(double v) { return v; }
};
template <>
struct Io<bf16_t> {
  using acc = float;
  static inline float load(bf16_t v) { return bf16_to_f32(v.bits); }
  static inline bf16_t make(float v) { return bf16_t{f32_to_bf16(v)}; }
};
template <>
struct Io<f16_t> {
  using acc = float;
  static inline float load(f16_t v) { return f16_to_f32(v.bits); }
  static inline f16_t make(float v) { return f16_t{f32_to_f16(v)}; }
};

inline float rsqrt_eps(float var) { return 1.0f / __builtin_sqrtf(var + static_cast<float>(kWhitenEps)); }
inline double rsqrt_eps(double var) { return 1.0 / __builtin_sqrt(var + kWhitenEps); }

// Heap buffer without std templates (see the file comment).
template <typename V>
struct Buffer {
  explicit Buffer(int64_t n) : data(new V[n > 0 ? n : 1]()) {}
  ~Buffer() { delete[] data; }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  V& operator[](int64_t i) { return data[i]; }
  V* data;
};
