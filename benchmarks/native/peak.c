/* Instruction throughput of this CPU per core-second: FP32 FMA, bf16 dot product (vdpbf16ps) and
 * INT8 dot product (vpdpbusd), 512-bit where AVX-512 is present, else 256-bit FMA only; plus the
 * clock from a chain of dependent integer adds (one per cycle). Built and run by
 * benchmarks/cpu_engine.py; prints one JSON line. Threads: OpenMP, one per core asked. */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <time.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

static double clock_ghz(void) {
    long n = 200000000, x = 0;
    double t = now();
    for (long i = 0; i < n; i++) __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
    return 4.0 * n / (now() - t) / 1e9;
}

#define REPS 20000000L
#define ACC 12
#ifdef __AVX512F__
#define VEC __m512
#define FMA(a) a = _mm512_fmadd_ps(a, m, s)
#define LANES 16
#else
#define VEC __m256
#define FMA(a) a = _mm256_fmadd_ps(a, m, s)
#define LANES 8
#endif

static double fp32_rate(int threads) {
    double t = now(), sink = 0;
#pragma omp parallel num_threads(threads) reduction(+:sink)
    {
#ifdef __AVX512F__
        VEC m = _mm512_set1_ps(0.999f), s = _mm512_set1_ps(1e-6f), a[ACC];
        for (int i = 0; i < ACC; i++) a[i] = _mm512_set1_ps((float)i);
#else
        VEC m = _mm256_set1_ps(0.999f), s = _mm256_set1_ps(1e-6f), a[ACC];
        for (int i = 0; i < ACC; i++) a[i] = _mm256_set1_ps((float)i);
#endif
        for (long r = 0; r < REPS; r++) { for (int i = 0; i < ACC; i++) FMA(a[i]); }
        float o[LANES];
        for (int i = 1; i < ACC; i++) a[0] = a[0] + a[i];
        __builtin_memcpy(o, &a[0], sizeof(o)); sink += o[0];
    }
    double dt = now() - t;
    if (sink == 42.0) printf(" ");
    return 2.0 * LANES * ACC * REPS * threads / dt / 1e9;  /* GFLOP/s, all threads */
}

#if defined(__AVX512BF16__)
static double bf16_rate(int threads) {
    double t = now(), sink = 0;
#pragma omp parallel num_threads(threads) reduction(+:sink)
    {
        __m512bh x = (__m512bh)_mm512_set1_epi16(0x3f80), y = (__m512bh)_mm512_set1_epi16(0x3800);
        __m512 a[ACC];
        for (int i = 0; i < ACC; i++) a[i] = _mm512_set1_ps((float)i);
        for (long r = 0; r < REPS; r++) { for (int i = 0; i < ACC; i++) a[i] = _mm512_dpbf16_ps(a[i], x, y); }
        for (int i = 1; i < ACC; i++) a[0] = a[0] + a[i];
        float o[16]; __builtin_memcpy(o, &a[0], sizeof(o)); sink += o[0];
    }
    double dt = now() - t;
    if (sink == 42.0) printf(" ");
    return 2.0 * 32 * ACC * REPS * threads / dt / 1e9;  /* 32 bf16 multiply-adds per instruction */
}
#endif

#if defined(__AVX512VNNI__)
static double int8_rate(int threads) {
    double t = now(), sink = 0;
#pragma omp parallel num_threads(threads) reduction(+:sink)
    {
        __m512i x = _mm512_set1_epi8(1), y = _mm512_set1_epi8(1), a[ACC];
        for (int i = 0; i < ACC; i++) a[i] = _mm512_set1_epi32(i);
        for (long r = 0; r < REPS; r++) { for (int i = 0; i < ACC; i++) a[i] = _mm512_dpbusd_epi32(a[i], x, y); }
        for (int i = 1; i < ACC; i++) a[0] = _mm512_add_epi32(a[0], a[i]);
        int o[16]; __builtin_memcpy(o, &a[0], sizeof(o)); sink += o[0];
    }
    double dt = now() - t;
    if (sink == 42.0) printf(" ");
    return 2.0 * 64 * ACC * REPS * threads / dt / 1e9;  /* 64 u8 x s8 multiply-adds per instruction */
}
#endif

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    double ghz = 0;
    for (int i = 0; i < 3; i++) { double g = clock_ghz(); if (g > ghz) ghz = g; }
    printf("{\"clock_ghz\": %.3f, \"vector_bits\": %d, \"fp32_gflops\": %.1f", ghz, LANES * 32, fp32_rate(threads));
#if defined(__AVX512BF16__)
    printf(", \"bf16_gflops\": %.1f", bf16_rate(threads));
#endif
#if defined(__AVX512VNNI__)
    printf(", \"int8_gops\": %.1f", int8_rate(threads));
#endif
    printf("}\n");
    return 0;
}
