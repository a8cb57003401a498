// The SIMD layer of the fusion and the nucleus sampler: one float pack type whose width is chosen at build
// time from the target the compiler was given (-march=native by default, like llama.cpp's GGML_NATIVE):
// 16 lanes with AVX-512, 8 with AVX/AVX2, 4 with NEON or SSE2, and plain floats (the scalar fallback) on
// other targets, on compilers without GCC vector extensions, or with -DSDA_SIMD_SCALAR. The arithmetic is
// written once, against `vfloat` and `float` alike, in the style of ggml's ggml_v_expf; the compiler emits
// the target's instructions. No -ffast-math: masked tokens are IEEE -inf, and NaN checks must survive.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

// __builtin_convertvector: clang, and GCC from version 9.
#if !defined(SDA_SIMD_SCALAR) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 9))
#if defined(__AVX512F__)
#define SDA_SIMD_BYTES 64
#elif defined(__AVX__)
#define SDA_SIMD_BYTES 32
#elif defined(__SSE2__) || defined(__ARM_NEON) || defined(__aarch64__)
#define SDA_SIMD_BYTES 16
#endif
#endif

namespace sda {

constexpr float kInf = std::numeric_limits<float>::infinity();

template <typename To, typename From>
inline To bit_cast(const From & from) {
    static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
    To to;
    std::memcpy(&to, &from, sizeof to);
    return to;
}

// The unsigned integers with the bits of V (a float or a pack of them).
template <typename V>
struct bits_of {
    using type = uint32_t;
};

// Scalar helpers: the same names as the pack's, so that templates take either.
inline float splat(float x, float) { return x; }
inline float select(bool m, float a, float b) { return m ? a : b; }
inline float vmax(float a, float b) { return a > b ? a : b; }  // NaN-ignoring when `b` is the accumulator
inline float vmin(float a, float b) { return a < b ? a : b; }
inline float vabs(float x) { return x < 0.0f ? -x : x; }
inline double select(bool m, double a, double b) { return m ? a : b; }
inline double splat(double x, double) { return x; }
inline double widen(float v) { return v; }
inline float narrow(double v) { return static_cast<float>(v); }

#ifdef SDA_SIMD_BYTES
constexpr size_t kWidth = SDA_SIMD_BYTES / sizeof(float);
typedef float vfloat __attribute__((vector_size(SDA_SIMD_BYTES)));
typedef int32_t vint __attribute__((vector_size(SDA_SIMD_BYTES)));
typedef uint32_t vuint __attribute__((vector_size(SDA_SIMD_BYTES)));
// Double arithmetic runs on half packs: as many doubles as fill one register.
constexpr size_t kHalf = kWidth / 2;
typedef float vhalf __attribute__((vector_size(SDA_SIMD_BYTES / 2)));
typedef int32_t vhalfint __attribute__((vector_size(SDA_SIMD_BYTES / 2)));
typedef double vdouble __attribute__((vector_size(SDA_SIMD_BYTES)));
typedef int64_t vlong __attribute__((vector_size(SDA_SIMD_BYTES)));

inline vfloat load(const float * p) {
    vfloat v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
inline void store(float * p, vfloat v) { std::memcpy(p, &v, sizeof v); }
inline vhalf load_half(const float * p) {
    vhalf v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
inline void store_half(float * p, vhalf v) { std::memcpy(p, &v, sizeof v); }
inline vfloat splat(float x, vfloat) { return vfloat{} + x; }
inline vhalf splat(float x, vhalf) { return vhalf{} + x; }
inline vfloat select(vint m, vfloat a, vfloat b) { return m ? a : b; }
inline vhalf select(vhalfint m, vhalf a, vhalf b) { return m ? a : b; }
inline vdouble select(vlong m, vdouble a, vdouble b) { return m ? a : b; }
template <>
struct bits_of<vfloat> {
    using type = vuint;
};
inline vfloat vmax(vfloat a, vfloat b) { return a > b ? a : b; }
inline vfloat vmin(vfloat a, vfloat b) { return a < b ? a : b; }
inline vfloat vabs(vfloat x) { return x < 0.0f ? -x : x; }
inline vdouble widen(vhalf v) { return __builtin_convertvector(v, vdouble); }
inline vhalf narrow(vdouble v) { return __builtin_convertvector(v, vhalf); }
inline vdouble splat(double x, vdouble) { return vdouble{} + x; }
inline double hsum(vdouble v) {
    double s = 0.0;
    for (size_t j = 0; j < kHalf; ++j) s += v[j];
    return s;
}

inline float hmax(vfloat v) {
    float m = v[0];
    for (size_t j = 1; j < kWidth; ++j) m = v[j] > m ? v[j] : m;
    return m;
}
inline float hmin(vfloat v) {
    float m = v[0];
    for (size_t j = 1; j < kWidth; ++j) m = v[j] < m ? v[j] : m;
    return m;
}
#else
constexpr size_t kWidth = 1;
constexpr size_t kHalf = 1;
typedef float vfloat;
typedef float vhalf;
typedef bool vint;
typedef double vdouble;

inline vfloat load(const float * p) { return *p; }
inline void store(float * p, vfloat v) { *p = v; }
inline vhalf load_half(const float * p) { return *p; }
inline void store_half(float * p, vhalf v) { *p = v; }
inline float hmax(float v) { return v; }
inline float hmin(float v) { return v; }
inline double hsum(double v) { return v; }
#endif

// A sum of many floats with double accuracy: float lanes over short runs (8 packs), then double lanes.
// Widening every pack would cost more than the arithmetic being summed.
class lane_sum {
public:
    void add(vfloat v) {
        part_ += v;
        if (++count_ == kRun) flush();
    }
    double total() {
        flush();
        double s = 0.0;
        for (double v : acc_) s += v;
        return s;
    }

private:
    static constexpr int kRun = 8;
    void flush() {
        float lanes[kWidth];
        store(lanes, part_);
        for (size_t j = 0; j < kWidth; ++j) acc_[j] += lanes[j];
        part_ = splat(0.0f, part_);
        count_ = 0;
    }
    vfloat part_ = splat(0.0f, vfloat{});
    int count_ = 0;
    double acc_[kWidth] = {};
};

// exp(x) for x <= 0; 0 for x < -87.3 and for -inf; NaN for NaN (so that a sum of them shows it). Branch-free:
// ggml's ggml_v_expf polynomial (max error 1.9 ulp, 13 operations), 2^n by adding n to the exponent bits.
template <typename V>
inline V exp_nonpositive(V x) {
    const auto underflow = x < -87.3365447f;
    const V zero = splat(0.0f, x);
    x = select(underflow, zero, x);
    const V z = x * 0x1.715476p+0f + 0x1.8p23f;  // n = round(x / ln2) sits in the low mantissa bits of z
    const V n = z - 0x1.8p23f;
    const V b = (x - n * 0x1.62e4p-1f) - n * 0x1.7f7d1cp-20f;  // x - n ln2, in two parts
    const V u = b * b;
    const V j = ((0x1.0e4020p-7f * b + 0x1.573e2ep-5f) * u + (0x1.555e66p-3f * b + 0x1.fffdb6p-2f)) * u +
                0x1.ffffecp-1f * b;  // exp(b) - 1
    using B = typename bits_of<V>::type;
    const V k = bit_cast<V>((bit_cast<B>(z) << 23u) + bit_cast<B>(splat(1.0f, x)));  // 2^n
    return select(underflow, zero, j * k + k);
}

// log(1 + lo / hi) for 0 <= lo <= hi, hi > 0, as 2 atanh(t) with t = lo / (2 hi + lo) <= 1/3: eight odd terms
// reach float precision, a small ratio keeps full relative accuracy, and there is one division.
template <typename V>
inline V log1p_ratio(V lo, V hi) {
    const V t = lo / (hi + hi + lo);
    const V t2 = t * t;
    V s = splat(1.0f / 15.0f, lo);
    s = s * t2 + 1.0f / 13.0f;
    s = s * t2 + 1.0f / 11.0f;
    s = s * t2 + 1.0f / 9.0f;
    s = s * t2 + 1.0f / 7.0f;
    s = s * t2 + 1.0f / 5.0f;
    s = s * t2 + 1.0f / 3.0f;
    s = s * t2 + 1.0f;
    return 2.0f * t * s;
}

// The last n % kWidth entries as a full pack, padded with `pad` (a value the pass ignores).
inline vfloat load_tail(const float * p, size_t count, float pad) {
    float buf[kWidth];
    for (size_t j = 0; j < kWidth; ++j) buf[j] = j < count ? p[j] : pad;
    return load(buf);
}

}  // namespace sda
