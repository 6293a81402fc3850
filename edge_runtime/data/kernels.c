/* edgefm native kernels, as onnxruntime custom ops.
 *
 * 1. BlockOffsetAdd: the offset term of the asymmetric 4-bit recipe (inference graphs).
 * 2. Q8MatMul / Q8MatMulTransB: matmuls by the training graph's frozen 8-bit base, one copy of each weight
 *    for the forward and the backward (below).
 *
 * BlockOffsetAdd(y [..., N] float, x [..., K] float, C [K/B, N] float16) -> y + S(x) @ C
 * where S(x) [..., K/B] are the sums of x over each block of B = K / (K/B) inputs. The exported graph
 * holds the same computation as an ONNX model-local function (edgefm.native domain); onnxruntime runs
 * this kernel for it when the library is registered and inlines the function (Reshape, ReduceSum,
 * Cast, MatMul, Add) when it is not, so a bundle runs everywhere and the library is only a speed-up.
 * Why native: in the inlined form the term costs six graph nodes per linear and reads C in fp32; here
 * it is one node reading C in fp16 (decode is bound by per-node overhead and bytes read).
 *
 * onnxruntime's C API header is not shipped by any package registry this project can reach, so the
 * few entry points used are declared here from the published ABI: the OrtApi function table is
 * append-only, so a slot number never changes, and OrtApiBase::GetApi(version) hands out the table of
 * any earlier API version. Built by edge_runtime/native.py with the machine's C compiler. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__F16C__) && defined(__AVX2__) && defined(__FMA__)
#define EDGEFM_X86_F16C 1
#endif

typedef struct OrtStatus OrtStatus;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtValue OrtValue;
typedef struct OrtShapeInfo OrtShapeInfo;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtApi { void *slot[512]; } OrtApi;
typedef struct OrtApiBase {
  const OrtApi *(*GetApi)(uint32_t version);
  const char *(*GetVersionString)(void);
} OrtApiBase;

/* slot numbers in struct OrtApi (onnxruntime_c_api.h, unchanged since API version 1) */
enum {
  ORT_CREATE_STATUS = 0,
  ORT_CREATE_CUSTOM_OP_DOMAIN = 26,
  ORT_CUSTOM_OP_DOMAIN_ADD = 27,
  ORT_ADD_CUSTOM_OP_DOMAIN = 28,
  ORT_GET_TENSOR_MUTABLE_DATA = 51,
  ORT_GET_DIMENSIONS_COUNT = 61,
  ORT_GET_DIMENSIONS = 62,
  ORT_GET_TENSOR_TYPE_AND_SHAPE = 65,
  ORT_KERNEL_INFO_GET_ATTRIBUTE_FLOAT = 85,
  ORT_KERNEL_INFO_GET_ATTRIBUTE_INT64 = 86,
  ORT_KERNEL_CONTEXT_GET_INPUT = 90,
  ORT_KERNEL_CONTEXT_GET_OUTPUT = 91,
  ORT_RELEASE_STATUS = 93,
  ORT_RELEASE_TENSOR_TYPE_AND_SHAPE_INFO = 99,
  ORT_CREATE_OP_ATTR = 211, /* API version 12 on: a built-in operator called from a custom one */
  ORT_RELEASE_OP_ATTR = 212,
  ORT_CREATE_OP = 213,
  ORT_INVOKE_OP = 214,
  ORT_RELEASE_OP = 215,
  ORT_KERNEL_CONTEXT_PARALLEL_FOR = 274, /* API version 17 on */
};
#define ORT_API_VERSION_USED 17 /* onnxruntime >= 1.17 */
#define ONNX_FLOAT 1
#define ONNX_UINT8 2
#define ONNX_INT8 3
#define ONNX_INT32 6
#define ONNX_FLOAT16 10

static const OrtApi *ort;
#define ORT_FN(index, type) ((type)ort->slot[index])

/* struct OrtCustomOp as of API version 17 (fields after version 7 are read by onnxruntime only when
 * `version` says they exist; all are filled) */
typedef struct OrtCustomOp {
  uint32_t version;
  void *(*CreateKernel)(const struct OrtCustomOp *, const OrtApi *, const OrtKernelInfo *);
  const char *(*GetName)(const struct OrtCustomOp *);
  const char *(*GetExecutionProviderType)(const struct OrtCustomOp *);
  int (*GetInputType)(const struct OrtCustomOp *, size_t);
  size_t (*GetInputTypeCount)(const struct OrtCustomOp *);
  int (*GetOutputType)(const struct OrtCustomOp *, size_t);
  size_t (*GetOutputTypeCount)(const struct OrtCustomOp *);
  void (*KernelCompute)(void *, OrtKernelContext *);
  void (*KernelDestroy)(void *);
  int (*GetInputCharacteristic)(const struct OrtCustomOp *, size_t);
  int (*GetOutputCharacteristic)(const struct OrtCustomOp *, size_t);
  int (*GetInputMemoryType)(const struct OrtCustomOp *, size_t);
  int (*GetVariadicInputMinArity)(const struct OrtCustomOp *);
  int (*GetVariadicInputHomogeneity)(const struct OrtCustomOp *);
  int (*GetVariadicOutputMinArity)(const struct OrtCustomOp *);
  int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOp *);
  OrtStatus *(*CreateKernelV2)(const struct OrtCustomOp *, const OrtApi *, const OrtKernelInfo *, void **);
  OrtStatus *(*KernelComputeV2)(void *, OrtKernelContext *);
  void *InferOutputShapeFn;
  int (*GetStartVersion)(const struct OrtCustomOp *);
  int (*GetEndVersion)(const struct OrtCustomOp *);
  size_t (*GetMayInplace)(int **, int **);
  void (*ReleaseMayInplace)(int *, int *);
  size_t (*GetAliasMap)(int **, int **);
  void (*ReleaseAliasMap)(int *, int *);
} OrtCustomOp;

/* ---- the arithmetic (plain C, no onnxruntime types: edgefm_block_offset_add is also called by the tests) ---- */

static inline float h2f(uint16_t h) {
  /* IEEE half to float, subnormals included */
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {
      exp = 127 - 15 + 1;
      while (!(man & 0x400u)) { man <<= 1; exp--; }
      bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

typedef struct {
  const float *y, *x;
  const uint16_t *c;
  float *out;
  size_t rows, k, nb, n;
} Job;

static void block_sums(const Job *j, size_t row, float *s) {
  const size_t blk = j->k / j->nb;
  for (size_t b = 0; b < j->nb; b++) {
    const float *xb = j->x + row * j->k + b * blk;
    float lane[8] = {0};  /* eight partial sums: a vector register, not a chain of dependent adds */
    size_t i = 0;
    for (; i + 8 <= blk; i += 8)
      for (size_t l = 0; l < 8; l++) lane[l] += xb[i + l];
    float a = ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
    for (; i < blk; i++) a += xb[i];
    s[b] = a;
  }
}

/* one row (a token step): out = y, then C streamed row by row (sequential reads, out stays in L1) */
static void rows_1(const Job *j, size_t r) {
  const size_t NB = j->nb, N = j->n;
  float s[1024];
  float *out = j->out + r * N;
  block_sums(j, r, s);
  memcpy(out, j->y + r * N, N * sizeof(float));
  for (size_t b = 0; b < NB; b++) {
    const uint16_t *cb = j->c + b * N;
    size_t col = 0;
#ifdef EDGEFM_X86_F16C
    const __m256 sb = _mm256_set1_ps(s[b]);
    for (; col + 8 <= N; col += 8) {
      const __m256 cv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(cb + col)));
      _mm256_storeu_ps(out + col, _mm256_fmadd_ps(sb, cv, _mm256_loadu_ps(out + col)));
    }
#endif
    for (; col < N; col++) out[col] += s[b] * h2f(cb[col]);
  }
}

/* four rows (prompts): eight columns at a time held in registers across every block, so each C element
 * loaded serves four rows and the outputs are written once */
static void rows_4(const Job *j, size_t r) {
  const size_t NB = j->nb, N = j->n;
  float s[4][1024];
  for (size_t t = 0; t < 4; t++) block_sums(j, r + t, s[t]);
  size_t col = 0;
#ifdef EDGEFM_X86_F16C
  for (; col + 16 <= N; col += 16) {  /* 4 rows x 16 columns: eight accumulators, each broadcast used twice */
    __m256 lo[4], hi[4];
    for (size_t t = 0; t < 4; t++) {
      lo[t] = _mm256_loadu_ps(j->y + (r + t) * N + col);
      hi[t] = _mm256_loadu_ps(j->y + (r + t) * N + col + 8);
    }
    for (size_t b = 0; b < NB; b++) {
      const __m256 c0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(j->c + b * N + col)));
      const __m256 c1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(j->c + b * N + col + 8)));
      for (size_t t = 0; t < 4; t++) {
        const __m256 sb = _mm256_set1_ps(s[t][b]);
        lo[t] = _mm256_fmadd_ps(sb, c0, lo[t]);
        hi[t] = _mm256_fmadd_ps(sb, c1, hi[t]);
      }
    }
    for (size_t t = 0; t < 4; t++) {
      _mm256_storeu_ps(j->out + (r + t) * N + col, lo[t]);
      _mm256_storeu_ps(j->out + (r + t) * N + col + 8, hi[t]);
    }
  }
  for (; col + 8 <= N; col += 8) {
    __m256 acc[4];
    for (size_t t = 0; t < 4; t++) acc[t] = _mm256_loadu_ps(j->y + (r + t) * N + col);
    for (size_t b = 0; b < NB; b++) {
      const __m256 cv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(j->c + b * N + col)));
      for (size_t t = 0; t < 4; t++) acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(s[t][b]), cv, acc[t]);
    }
    for (size_t t = 0; t < 4; t++) _mm256_storeu_ps(j->out + (r + t) * N + col, acc[t]);
  }
#endif
  for (; col < N; col++) {
    float acc[4];
    for (size_t t = 0; t < 4; t++) acc[t] = j->y[(r + t) * N + col];
    for (size_t b = 0; b < NB; b++) {
      const float cv = h2f(j->c[b * N + col]);
      for (size_t t = 0; t < 4; t++) acc[t] += s[t][b] * cv;
    }
    for (size_t t = 0; t < 4; t++) j->out[(r + t) * N + col] = acc[t];
  }
}

/* The work in independent tasks of four rows (prompts), run on onnxruntime's intra-op pool in the op and
 * in a loop when called directly. A token step is one task on the calling thread: splitting its
 * columns over the pool measured no faster (dispatch costs what the split saves). */
static size_t task_count(const Job *j) { return j->rows >= 8 ? (j->rows + 3) / 4 : 1; }

static void run_task(void *arg, size_t task) {
  const Job *j = (const Job *)arg;
  size_t r = 0, end = j->rows;
  if (j->rows >= 8) {
    r = task * 4;
    end = r + 4 < j->rows ? r + 4 : j->rows;
  }
  for (; r + 4 <= end; r += 4) rows_4(j, r);
  for (; r < end; r++) rows_1(j, r);
}

static int valid(size_t k, size_t nb) { return nb != 0 && nb <= 1024 && k % nb == 0; }

/* Returns 0, or -1 for shapes the kernel does not take (the caller reports it). Single-threaded. */
int edgefm_block_offset_add(const float *y, const float *x, const uint16_t *c, float *out, size_t rows, size_t k,
                            size_t nb, size_t n) {
  if (!valid(k, nb)) return -1;
  const Job job = {y, x, c, out, rows, k, nb, n};
  const size_t tasks = task_count(&job);
  for (size_t i = 0; i < tasks; i++) run_task((void *)&job, i);
  return 0;
}

/* ---- Q8MatMul / Q8MatMulTransB: matmuls by a frozen 8-bit weight, one copy for both directions ----
 *
 * D [R, C] = Q [R, C] (int8) * S [R, C/B] (float: one scale per block of B along C; B a multiple of 16)
 *   Q8MatMulTransB(X [..., C], Q, S) = X @ D^T   (a linear's forward; D's blocks run along the reduction)
 *   Q8MatMul(X [..., R], Q, S)       = X @ D     (its input gradient, from the same bytes)
 * onnxruntime's MatMulNBits prepacks its weight for one direction only, so the training graph held every
 * frozen weight twice, plus the packed copies. Here Y is computed in panels of 16 columns: a task
 * dequantizes its panel of D to float ([K][16], KC rows of K at a time, so it stays in L1/L2) and
 * multiplies every row of X by it, MR rows at a time in vector registers. Written with the compiler's
 * vector extensions (16 floats: one AVX-512 register, two AVX2 or four NEON registers), so the same
 * source vectorizes on every device. */

typedef float v16f __attribute__((vector_size(64)));

/* 16 int8 times a scale, as floats (GCC 12 turns the vector extension's int8 -> float conversion, and
 * a plain loop of them, into scalar code: two to three times the cost of a panel's arithmetic) */
static inline v16f q8_floats(const int8_t *q, float scale) {
#if defined(__AVX512F__)
  return (v16f)_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q))),
                             _mm512_set1_ps(scale));
#elif defined(__AVX2__)
  const __m256 k = _mm256_set1_ps(scale);
  const __m256 lo = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q))), k);
  const __m256 hi = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8)))), k);
  v16f f;
  memcpy(&f, &lo, sizeof lo);
  memcpy((char *)&f + sizeof lo, &hi, sizeof hi);
  return f;
#else
  float lane[16];
  for (int i = 0; i < 16; i++) lane[i] = (float)q[i] * scale;
  v16f f;
  memcpy(&f, lane, sizeof f);
  return f;
#endif
}

/* the multiply runs on the machine's own vector width: VW floats a register, NV registers a panel row */
#if defined(__AVX512F__)
#define Q8_VW 16
#define Q8_MR 12 /* rows in registers: 12 accumulators (of 32 registers) */
#elif defined(__AVX__)
#define Q8_VW 8
#define Q8_MR 6 /* 6 rows x 2 = 12 accumulators (of 16 registers) */
#elif defined(__aarch64__)
#define Q8_VW 4
#define Q8_MR 6 /* 6 rows x 4 = 24 accumulators (of 32 registers) */
#else
#define Q8_VW 4
#define Q8_MR 3 /* 3 rows x 4 = 12 accumulators (of 16 registers) */
#endif
#define Q8_NV (16 / Q8_VW)
typedef float vf __attribute__((vector_size(Q8_VW * 4)));
typedef float vf_u __attribute__((vector_size(Q8_VW * 4), aligned(4)));
#define Q8_KC 512 /* rows of the panel built at a time: 32 KB */

typedef struct {
  const float *x;
  const int8_t *q;
  const float *s;
  float *y;
  size_t m, r, c, blk;
  int trans; /* 1: X @ D^T, 0: X @ D */
} Q8Job;

/* y[i][0:w] (+)= x[i][0:kc] @ P[0:kc][0:16] for `rows` rows (a constant once inlined) */
static inline __attribute__((always_inline)) void q8_rows(const float *x, size_t ldx, size_t kc, const float *p, float *y,
                                                         size_t ldy, size_t w, int accumulate, const int rows) {
  vf acc[Q8_MR > 4 ? Q8_MR : 4][Q8_NV]; /* calls take Q8_MR, 4 or 1 rows */
  for (int i = 0; i < rows; i++)
    for (int v = 0; v < Q8_NV; v++) acc[i][v] = (vf){0};
  for (size_t k = 0; k < kc; k++) {
    vf b[Q8_NV];
    for (int v = 0; v < Q8_NV; v++) b[v] = *(const vf *)(p + k * 16 + v * Q8_VW);
    for (int i = 0; i < rows; i++) {
      const float a = x[i * ldx + k];
      for (int v = 0; v < Q8_NV; v++) acc[i][v] += a * b[v];
    }
  }
  for (int i = 0; i < rows; i++) {
    float *out = y + i * ldy;
    if (w == 16) {
      for (int v = 0; v < Q8_NV; v++) {
        vf r = acc[i][v];
        if (accumulate) r += *(const vf_u *)(out + v * Q8_VW);
        memcpy(out + v * Q8_VW, &r, sizeof r);
      }
    } else {
      float lane[16];
      memcpy(lane, acc[i], sizeof lane);
      for (size_t t = 0; t < w; t++) out[t] = (accumulate ? out[t] : 0.f) + lane[t];
    }
  }
}

/* 16x16 transpose in registers: at distance d = 8, 4, 2, 1, rows i and i + d swap their off-diagonal d x d
 * blocks (four rounds of two-source shuffles instead of 256 scattered stores) */
#if defined(__clang__)
#define Q8_SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int32_t v16i __attribute__((vector_size(64)));
#define Q8_SHUF(a, b, ...) __builtin_shuffle(a, b, (v16i){__VA_ARGS__})
#endif
#define Q8_LIST(...) __VA_ARGS__
#define Q8_SWAP(d, A, B)                      \
  for (size_t i = 0; i < 16; i++) {           \
    if (i & (d)) continue;                    \
    const v16f a = v[i], b = v[i + (d)];      \
    v[i] = Q8_SHUF(a, b, Q8_LIST A);          \
    v[i + (d)] = Q8_SHUF(a, b, Q8_LIST B);    \
  }
static inline void q8_transpose(v16f v[16]) {
  Q8_SWAP(8, (0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
          (8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31))
  Q8_SWAP(4, (0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27),
          (4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31))
  Q8_SWAP(2, (0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29),
          (2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31))
  Q8_SWAP(1, (0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30),
          (1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31))
}

/* rows k0..k0+kc of the panel of columns j..j+w of B (D^T or D), dequantized into p [kc][16] (zeros past w) */
static void q8_panel(const Q8Job *jb, size_t j, size_t w, size_t k0, size_t kc, float *p) {
  const size_t nb = jb->c / jb->blk;
  if (jb->trans) { /* B = D^T: column j+t of B is row j+t of D; 16x16 tiles dequantized, then transposed */
    for (size_t k = 0; k < kc; k += 16) {
      const size_t b = (k0 + k) / jb->blk;
      v16f v[16];
      for (size_t t = 0; t < 16; t++)
        v[t] = t < w ? q8_floats(jb->q + (j + t) * jb->c + k0 + k, jb->s[(j + t) * nb + b])
                     : (v16f){0};
      q8_transpose(v);
      for (size_t u = 0; u < 16; u++) memcpy(p + (k + u) * 16, &v[u], sizeof v[u]);
    }
  } else { /* B = D: 16 consecutive int8 of row k, all in one block (j and B are multiples of 16) */
    const int8_t *q = jb->q + k0 * jb->c + j;
    const float *sc = jb->s + k0 * nb + j / jb->blk;
    for (size_t k = 0; k < kc; k++) {
      const v16f f = q8_floats(q + k * jb->c, sc[k * nb]);
      memcpy(p + k * 16, &f, sizeof f);
    }
  }
}

static size_t q8_cols(const Q8Job *jb) { return jb->trans ? jb->r : jb->c; }
static size_t q8_depth(const Q8Job *jb) { return jb->trans ? jb->c : jb->r; }
/* A task computes Q8_GROUP neighbouring panels, chunk of K by chunk: the chunk's rows of X and (for
 * X @ D) the cache lines of Q it reads serve all of them before the next chunk is read */
#define Q8_GROUP 4
/* and one block of at most Q8_ROWS rows of X: a training step's 1024 rows streamed whole past every
 * panel group ran at half speed (its chunk of X no longer stays in L2 between the group's panels) */
#define Q8_ROWS 256
static size_t q8_panels(const Q8Job *jb) { return (q8_cols(jb) + 15) / 16; }
static size_t q8_group(const Q8Job *jb) { return q8_panels(jb) >= 4 * Q8_GROUP ? Q8_GROUP : 1; }
static size_t q8_groups(const Q8Job *jb) { return (q8_panels(jb) + q8_group(jb) - 1) / q8_group(jb); }
static size_t q8_tasks(const Q8Job *jb) { return q8_groups(jb) * ((jb->m + Q8_ROWS - 1) / Q8_ROWS); }

static void q8_task(void *arg, size_t task) {
  const Q8Job *jb = (const Q8Job *)arg;
  const size_t n = q8_cols(jb), depth = q8_depth(jb), group = q8_group(jb);
  const size_t first = task % q8_groups(jb) * group, last = first + group < q8_panels(jb) ? first + group : q8_panels(jb);
  const size_t r0 = task / q8_groups(jb) * Q8_ROWS, r1 = r0 + Q8_ROWS < jb->m ? r0 + Q8_ROWS : jb->m;
  float p[Q8_KC * 16] __attribute__((aligned(64)));
  for (size_t k0 = 0; k0 < depth; k0 += Q8_KC) {
    const size_t kc = depth - k0 < Q8_KC ? depth - k0 : Q8_KC;
    for (size_t panel = first; panel < last; panel++) {
      const size_t j = panel * 16, w = n - j < 16 ? n - j : 16;
      q8_panel(jb, j, w, k0, kc, p);
      const float *x = jb->x + k0;
      float *y = jb->y + j;
      size_t i = r0;
      for (; i + Q8_MR <= r1; i += Q8_MR) q8_rows(x + i * depth, depth, kc, p, y + i * n, n, w, k0 > 0, Q8_MR);
      for (; i + 4 <= r1; i += 4) q8_rows(x + i * depth, depth, kc, p, y + i * n, n, w, k0 > 0, 4);
      for (; i < r1; i++) q8_rows(x + i * depth, depth, kc, p, y + i * n, n, w, k0 > 0, 1);
    }
  }
}

static int q8_valid(size_t r, size_t c, size_t nb) { return r && nb && c % nb == 0 && (c / nb) % 16 == 0; }

/* Returns 0, or -1 for shapes the kernels do not take. Single-threaded (the tests call it directly). */
int edgefm_q8_matmul(const float *x, const int8_t *q, const float *s, float *y, size_t m, size_t r, size_t c, size_t nb,
                     int trans) {
  if (!q8_valid(r, c, nb)) return -1;
  const Q8Job job = {x, q, s, y, m, r, c, c / nb, trans != 0};
  for (size_t t = 0; t < q8_tasks(&job); t++) q8_task((void *)&job, t);
  return 0;
}

/* ---- Q4MatMul: the inference graphs' 4-bit linears, int8 activations, offsets inside ----
 *
 * Y [M, N] = X [M, K] @ W, W [K, N] in blocks of 32 along K: w = s (q - 8) (+ c: the asymmetric recipe's
 * per-block offset, when C is given), q 4-bit, s and c fp16 [K/32, N].
 * The packed weight P [N/16, K/32, 4, 16, 4] holds onnxruntime MatMulNBits' bytes (two 4-bit values a
 * byte, element 2i in the low nibble of byte i) regrouped: for 16 neighbouring columns and one block,
 * chunk j holds bytes 4j..4j+3 of each column, so one 64-byte load carries 16 columns x 8 elements and
 * one int8 dot-product instruction (four bytes a lane) serves 16 columns. The exported function body
 * undoes the regrouping (a constant Transpose onnxruntime folds at load) and calls MatMulNBits: the same
 * bytes, one copy, either way.
 * X is quantized per row and block to int8 (scale absmax / 127, the precision MatMulNBits' accuracy
 * level 4 computes at), in the order the nibbles come out: within each 8 elements, the even ones, then
 * the odd ones. Per block, row and column: sum_i q_i x_i in int32 (q unsigned 0..15), minus 8 sum_i x_i,
 * times s dx; plus c times the block's exact float sum of x. */

#define Q4_BLOCK 32

typedef struct {
  int8_t *q;    /* [M][nb][32], the permuted order above */
  float *dx;    /* [M][nb] scales */
  int32_t *s8;  /* [M][nb] 8 * sum of the block's int8 values */
  float *sum;   /* [M][nb] exact float sums (offsets) */
} Q4Acts;

typedef struct {
  const float *x;
  const uint8_t *p;
  const uint16_t *s, *c; /* c may be NULL */
  float *y;
  size_t m, k, n, nb;
  Q4Acts a;
  int bits; /* 4: Q4MatMul(Offset); 8: Q8Linear (P [N/16, K/32, 8, 16, 4]: chunk t holds bytes 4t..4t+3, natural order) */
} Q4Job;

#if defined(__AVX512VNNI__) && defined(__AVX512F__) && defined(__AVX512BW__)
#define Q4_AVX512 1
#define Q4_MR 8 /* rows a column group is multiplied with per pass over its weights (8 accumulators) */
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define Q4_AVX2 1
#define Q4_MR 4 /* 8 unpacked weight registers + 4 accumulators of 16 */
#else
#define Q4_MR 8
#endif

/* One row of X to int8 blocks. The vector form rounds as lrintf does (to nearest, ties to even: the
 * default MXCSR mode) and multiplies by the same 127 / absmax, so both give the same bytes; the block's
 * float sum is added in another order (a rounding's difference in the offset term). On a single-token
 * step this runs before the column tasks, while the other threads wait. */
static void q4_quantize_row(const Q4Job *jb, size_t row) {
  const float *x = jb->x + row * jb->k;
#if defined(Q4_AVX512)
  const __m512 nosign = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  /* within each 8 values, the even ones, then the odd ones (the order the nibbles come out of a byte) */
  const __m128i nibble_order = _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
  for (size_t b = 0; b < jb->nb; b++) {
    const __m512 v0 = _mm512_loadu_ps(x + b * Q4_BLOCK), v1 = _mm512_loadu_ps(x + b * Q4_BLOCK + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(v0, nosign), _mm512_and_ps(v1, nosign)));
    const float id = amax > 0.f ? 127.f / amax : 0.f;
    const __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(id)));
    const __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(id)));
    __m128i b0 = _mm512_cvtsepi32_epi8(i0), b1 = _mm512_cvtsepi32_epi8(i1); /* |values| <= 127: no saturation */
    if (jb->bits == 4) b0 = _mm_shuffle_epi8(b0, nibble_order), b1 = _mm_shuffle_epi8(b1, nibble_order);
    int8_t *q = jb->a.q + (row * jb->nb + b) * Q4_BLOCK;
    _mm_storeu_si128((__m128i *)q, b0);
    _mm_storeu_si128((__m128i *)(q + 16), b1);
    const int32_t total = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
    jb->a.dx[row * jb->nb + b] = amax / 127.f;
    jb->a.s8[row * jb->nb + b] = (jb->bits == 8 ? 128 : 8) * total;
    jb->a.sum[row * jb->nb + b] = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
  }
#else
  for (size_t b = 0; b < jb->nb; b++) {
    const float *xb = x + b * Q4_BLOCK;
    float amax = 0.f, sum = 0.f;
    for (int i = 0; i < Q4_BLOCK; i++) {
      const float v = xb[i] < 0 ? -xb[i] : xb[i];
      amax = v > amax ? v : amax;
      sum += xb[i];
    }
    const float id = amax > 0.f ? 127.f / amax : 0.f;
    int8_t *q = jb->a.q + (row * jb->nb + b) * Q4_BLOCK;
    int32_t total = 0;
    if (jb->bits == 8) /* natural order; the weights' zero point is 128 */
      for (int i = 0; i < Q4_BLOCK; i++) {
        q[i] = (int8_t)__builtin_lrintf(xb[i] * id);
        total += q[i];
      }
    else
      for (int j = 0; j < 4; j++)
        for (int p = 0; p < 4; p++) {
          const int8_t lo = (int8_t)__builtin_lrintf(xb[8 * j + 2 * p] * id), hi = (int8_t)__builtin_lrintf(xb[8 * j + 2 * p + 1] * id);
          q[8 * j + p] = lo;
          q[8 * j + 4 + p] = hi;
          total += lo + hi;
        }
    jb->a.dx[row * jb->nb + b] = amax / 127.f;
    jb->a.s8[row * jb->nb + b] = (jb->bits == 8 ? 128 : 8) * total;
    jb->a.sum[row * jb->nb + b] = sum;
  }
#endif
}

/* whether this build has a vector path for Q4MatMul; where not, the library leaves those functions to
 * onnxruntime (their MatMulNBits body has kernels for every architecture) */
int edgefm_q4_vector(void) {
#if defined(Q4_AVX512) || defined(Q4_AVX2)
  return 1;
#else
  return 0;
#endif
}
#define Q4_GROUPS 4  /* column groups (of 16) a task takes */
#define Q4_ROWS 64   /* rows a task takes */

static void q4_groups_rows(const Q4Job *jb, size_t g, size_t r0, size_t rows) {
  const size_t nb = jb->nb, n = jb->n;
  const size_t bb = jb->bits == 8 ? 512 : 256; /* bytes of a block of 16 columns */
  const uint8_t *pg = jb->p + g * nb * bb;
#if defined(Q4_AVX512)
  const __m512i low = _mm512_set1_epi8(0x0f);
  __m512 acc[Q4_MR];
  for (size_t r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps();
  for (size_t b = 0; b < nb; b++) {
    const uint8_t *pb = pg + b * bb;
    __m512i w[8];
    if (jb->bits == 8)
      for (int t = 0; t < 8; t++) w[t] = _mm512_loadu_si512((const void *)(pb + 64 * t));
    else
      for (int j = 0; j < 4; j++) {
        const __m512i v = _mm512_loadu_si512((const void *)(pb + 64 * j));
        w[2 * j] = _mm512_and_si512(v, low);
        w[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      }
    const __m512 sv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(jb->s + b * n + g * 16)));
    __m512 cv = _mm512_setzero_ps();
    if (jb->c) cv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(jb->c + b * n + g * 16)));
    for (size_t r = 0; r < rows; r++) {
      const size_t at = (r0 + r) * nb + b;
      const int32_t *qx = (const int32_t *)(jb->a.q + at * Q4_BLOCK);
      __m512i d = _mm512_set1_epi32(-jb->a.s8[at]);
      for (int t = 0; t < 8; t++) d = _mm512_dpbusd_epi32(d, w[t], _mm512_set1_epi32(qx[t]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(sv, _mm512_set1_ps(jb->a.dx[at])), acc[r]);
      if (jb->c) acc[r] = _mm512_fmadd_ps(cv, _mm512_set1_ps(jb->a.sum[at]), acc[r]);
    }
  }
  for (size_t r = 0; r < rows; r++) _mm512_storeu_ps(jb->y + (r0 + r) * n + g * 16, acc[r]);
#elif defined(Q4_AVX2)
  /* 8 columns (one 32-byte half of each 64-byte chunk) at a time; u8 x s8 products summed in int16
   * (at most 16 x 15 x 127 = 30480 a lane over a block), then to int32 */
  const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8((char)0x80);
  for (int half = 0; half < 2; half++) {
    __m256 acc[Q4_MR];
    for (size_t r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
    for (size_t b = 0; b < nb; b++) {
      const uint8_t *pb = pg + b * bb + 32 * half;
      __m256i w[8];
      if (jb->bits == 8) /* signed q = B ^ 0x80; |q| (up to 128) as the unsigned operand, q's sign moved to x */
        for (int t = 0; t < 8; t++) w[t] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(pb + 64 * t)), flip);
      else
        for (int j = 0; j < 4; j++) {
          const __m256i v = _mm256_loadu_si256((const __m256i *)(pb + 64 * j));
          w[2 * j] = _mm256_and_si256(v, low);
          w[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        }
      const size_t col = b * n + g * 16 + 8 * half;
      const __m256 sv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(jb->s + col)));
      __m256 cv = _mm256_setzero_ps();
      if (jb->c) cv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(jb->c + col)));
      for (size_t r = 0; r < rows; r++) {
        const size_t at = (r0 + r) * nb + b;
        const int32_t *qx = (const int32_t *)(jb->a.q + at * Q4_BLOCK);
        __m256i d;
        if (jb->bits == 8) { /* a pair of products is at most 2 x 128 x 127: summed in int32 chunk by chunk */
          d = _mm256_setzero_si256();
          for (int t = 0; t < 8; t++) {
            const __m256i xs = _mm256_sign_epi8(_mm256_set1_epi32(qx[t]), w[t]);
            d = _mm256_add_epi32(d, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w[t]), xs), ones));
          }
        } else {
          __m256i d16 = _mm256_maddubs_epi16(w[0], _mm256_set1_epi32(qx[0]));
          for (int t = 1; t < 8; t++) d16 = _mm256_add_epi16(d16, _mm256_maddubs_epi16(w[t], _mm256_set1_epi32(qx[t])));
          d = _mm256_sub_epi32(_mm256_madd_epi16(d16, ones), _mm256_set1_epi32(jb->a.s8[at]));
        }
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(sv, _mm256_set1_ps(jb->a.dx[at])), acc[r]);
        if (jb->c) acc[r] = _mm256_fmadd_ps(cv, _mm256_set1_ps(jb->a.sum[at]), acc[r]);
      }
    }
    for (size_t r = 0; r < rows; r++) _mm256_storeu_ps(jb->y + (r0 + r) * n + g * 16 + 8 * half, acc[r]);
  }
#else
  float acc[Q4_MR][16];
  for (size_t r = 0; r < rows; r++)
    for (int c = 0; c < 16; c++) acc[r][c] = 0.f;
  for (size_t b = 0; b < nb; b++) {
    const uint8_t *pb = pg + b * bb;
    float sv[16], cv[16];
    for (int c = 0; c < 16; c++) {
      sv[c] = h2f(jb->s[b * n + g * 16 + c]);
      cv[c] = jb->c ? h2f(jb->c[b * n + g * 16 + c]) : 0.f;
    }
    for (size_t r = 0; r < rows; r++) {
      const size_t at = (r0 + r) * nb + b;
      const int8_t *qx = jb->a.q + at * Q4_BLOCK;
      int32_t d[16];
      for (int c = 0; c < 16; c++) d[c] = -jb->a.s8[at];
      if (jb->bits == 8)
        for (int t = 0; t < 8; t++)
          for (int c = 0; c < 16; c++)
            for (int p = 0; p < 4; p++) d[c] += (int32_t)pb[64 * t + 4 * c + p] * qx[4 * t + p];
      else
        for (int j = 0; j < 4; j++)
          for (int c = 0; c < 16; c++)
            for (int p = 0; p < 4; p++) {
              const uint8_t v = pb[64 * j + 4 * c + p];
              d[c] += (int32_t)(v & 15) * qx[8 * j + p] + (int32_t)(v >> 4) * qx[8 * j + 4 + p];
            }
      const float dx = jb->a.dx[at], sum = jb->a.sum[at];
      for (int c = 0; c < 16; c++) acc[r][c] += (float)d[c] * (sv[c] * dx) + cv[c] * sum;
    }
  }
  for (size_t r = 0; r < rows; r++) memcpy(jb->y + (r0 + r) * n + g * 16, acc[r], sizeof acc[r]);
#endif
}

static size_t q4_col_tasks(const Q4Job *jb) { return (jb->n / 16 + Q4_GROUPS - 1) / Q4_GROUPS; }
static size_t q4_tasks(const Q4Job *jb) { return q4_col_tasks(jb) * ((jb->m + Q4_ROWS - 1) / Q4_ROWS); }

static void q4_task(void *arg, size_t task) {
  const Q4Job *jb = (const Q4Job *)arg;
  const size_t groups = jb->n / 16, g0 = task % q4_col_tasks(jb) * Q4_GROUPS;
  const size_t g1 = g0 + Q4_GROUPS < groups ? g0 + Q4_GROUPS : groups;
  const size_t r0 = task / q4_col_tasks(jb) * Q4_ROWS, r1 = r0 + Q4_ROWS < jb->m ? r0 + Q4_ROWS : jb->m;
  for (size_t g = g0; g < g1; g++)
    for (size_t r = r0; r < r1; r += Q4_MR) q4_groups_rows(jb, g, r, r1 - r < Q4_MR ? r1 - r : Q4_MR);
}

static void q4_quantize_task(void *arg, size_t task) {
  const Q4Job *jb = (const Q4Job *)arg;
  for (size_t r = task * 16; r < jb->m && r < task * 16 + 16; r++) q4_quantize_row(jb, r);
}

static int q4_valid(size_t k, size_t n) { return k && n && k % Q4_BLOCK == 0 && n % 16 == 0; }

/* scratch for the quantized activations: the caller's buffer of Q4_STACK bytes where they fit (a
 * single-token step: no allocation per call), else one allocation, which q4_release frees */
#define Q4_STACK 8192
static size_t q4_scratch(const Q4Job *jb) { return jb->m * jb->nb * (Q4_BLOCK + 12); }
static int q4_alloc(Q4Job *jb, void *stack) {
  const size_t cells = jb->m * jb->nb;
  char *mem = q4_scratch(jb) <= Q4_STACK ? stack : malloc(q4_scratch(jb) + 64);
  if (!mem) return -1;
  jb->a.dx = (float *)mem;
  jb->a.sum = jb->a.dx + cells;
  jb->a.s8 = (int32_t *)(jb->a.sum + cells);
  jb->a.q = (int8_t *)(jb->a.s8 + cells);
  return 0;
}
static void q4_release(Q4Job *jb, void *stack) {
  if ((void *)jb->a.dx != stack) free(jb->a.dx);
}

/* Returns 0, or -1 for shapes the kernel does not take / no memory. Single-threaded (tests). */
int edgefm_q4_matmul(const float *x, const uint8_t *p, const uint16_t *s, const uint16_t *c, float *y, size_t m, size_t k,
                     size_t n, int bits) {
  if (!q4_valid(k, n) || (bits != 4 && bits != 8) || (bits == 8 && c)) return -1;
  Q4Job jb = {x, p, s, c, y, m, k, n, k / Q4_BLOCK, {0}, bits};
  float stack[Q4_STACK / sizeof(float)];
  if (q4_alloc(&jb, stack)) return -1;
  for (size_t t = 0; t < (m + 15) / 16; t++) q4_quantize_task(&jb, t);
  for (size_t t = 0; t < q4_tasks(&jb); t++) q4_task(&jb, t);
  q4_release(&jb, stack);
  return 0;
}

/* ---- the onnxruntime custom ops around them ---- */

static size_t dims_of(const OrtValue *v, int64_t *dims, size_t *rank) {
  OrtShapeInfo *info = NULL;
  ORT_FN(ORT_GET_TENSOR_TYPE_AND_SHAPE, OrtStatus *(*)(const OrtValue *, OrtShapeInfo **))(v, &info);
  *rank = 0;
  ORT_FN(ORT_GET_DIMENSIONS_COUNT, OrtStatus *(*)(const OrtShapeInfo *, size_t *))(info, rank);
  if (*rank > 8) *rank = 8;
  ORT_FN(ORT_GET_DIMENSIONS, OrtStatus *(*)(const OrtShapeInfo *, int64_t *, size_t))(info, dims, *rank);
  ORT_FN(ORT_RELEASE_TENSOR_TYPE_AND_SHAPE_INFO, void (*)(OrtShapeInfo *))(info);
  size_t count = 1;
  for (size_t i = 0; i < *rank; i++) count *= (size_t)dims[i];
  return count;
}

static void *data_of(const OrtValue *v) {
  void *p = NULL;
  ORT_FN(ORT_GET_TENSOR_MUTABLE_DATA, OrtStatus *(*)(const OrtValue *, void **))(v, &p);
  return p;
}

static OrtStatus *fail(const char *msg) {
  return ORT_FN(ORT_CREATE_STATUS, OrtStatus *(*)(int, const char *))(1 /* ORT_FAIL */, msg);
}

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
  (void)kernel;
  const OrtValue *in[3];
  for (size_t i = 0; i < 3; i++)
    ORT_FN(ORT_KERNEL_CONTEXT_GET_INPUT, OrtStatus *(*)(const OrtKernelContext *, size_t, const OrtValue **))(ctx, i, &in[i]);
  int64_t dy[8], dx[8], dc[8];
  size_t ry, rx, rc;
  const size_t ny = dims_of(in[0], dy, &ry), nx = dims_of(in[1], dx, &rx);
  dims_of(in[2], dc, &rc);
  OrtValue *outv = NULL;
  ORT_FN(ORT_KERNEL_CONTEXT_GET_OUTPUT, OrtStatus *(*)(OrtKernelContext *, size_t, const int64_t *, size_t, OrtValue **))(
      ctx, 0, dy, ry, &outv);
  if (!outv || rx == 0 || ry == 0 || rc != 2) return fail("BlockOffsetAdd: C must be [K/block, N]");
  const size_t k = (size_t)dx[rx - 1], n = (size_t)dy[ry - 1];
  if (k == 0 || n == 0 || (size_t)dc[1] != n || nx / k != ny / n) return fail("BlockOffsetAdd: y, x and C do not match");
  if (!valid(k, (size_t)dc[0])) return fail("BlockOffsetAdd: K must be a multiple of the block count (at most 1024 blocks)");
  const Job job = {(const float *)data_of(in[0]), (const float *)data_of(in[1]), (const uint16_t *)data_of(in[2]),
                   (float *)data_of(outv), nx / k, k, (size_t)dc[0], n};
  const size_t tasks = task_count(&job);
  if (tasks == 1) {
    run_task((void *)&job, 0);
    return NULL;
  }
  /* onnxruntime's own intra-op threads (they spin between ops: threads of our own would wait for them) */
  return ORT_FN(ORT_KERNEL_CONTEXT_PARALLEL_FOR,
                OrtStatus *(*)(const OrtKernelContext *, void (*)(void *, size_t), size_t, size_t, void *))(
      ctx, run_task, tasks, 0, (void *)&job);
}

static OrtStatus *create_kernel(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **kernel) {
  (void)op, (void)api, (void)info;
  static int stateless;
  *kernel = &stateless; /* the op keeps no state: any non-null pointer */
  return NULL;
}
static const char *op_name(const OrtCustomOp *op) { (void)op; return "BlockOffsetAdd"; }
static const char *op_provider(const OrtCustomOp *op) { (void)op; return NULL; /* CPU */ }
static int input_type(const OrtCustomOp *op, size_t i) { (void)op; return i == 2 ? ONNX_FLOAT16 : ONNX_FLOAT; }
static size_t input_count(const OrtCustomOp *op) { (void)op; return 3; }
static int output_type(const OrtCustomOp *op, size_t i) { (void)op, (void)i; return ONNX_FLOAT; }
static size_t output_count(const OrtCustomOp *op) { (void)op; return 1; }
static void destroy_kernel(void *kernel) { (void)kernel; }
static int required(const OrtCustomOp *op, size_t i) { (void)op, (void)i; return 0; }
static int one(const OrtCustomOp *op) { (void)op; return 1; }
static int last_version(const OrtCustomOp *op) { (void)op; return 2147483647; }
static size_t no_pairs(int **a, int **b) { *a = NULL, *b = NULL; return 0; }
static void free_pairs(int *a, int *b) { (void)a, (void)b; }

/* an OrtCustomOp (API version 17): the op's name, input types and count, kernel creation and compute */
#define CUSTOM_OP(name, input_type, input_count, create, compute)                                               \
  {17, NULL, name, op_provider, input_type, input_count, output_type, output_count, NULL, destroy_kernel, required, \
   required, required, one, one, one, one, create, compute, NULL, one, last_version, no_pairs, free_pairs, no_pairs, \
   free_pairs}

static OrtCustomOp block_offset_add = CUSTOM_OP(op_name, input_type, input_count, create_kernel, compute);

/* Q8MatMulTransB (kernel state 1) and Q8MatMul (0): X [..., K], Q [R, C] int8, S [R, C/B] -> Y [..., N] */
static OrtStatus *q8_compute(void *kernel, OrtKernelContext *ctx) {
  const int trans = *(const int *)kernel;
  const OrtValue *in[3];
  for (size_t i = 0; i < 3; i++)
    ORT_FN(ORT_KERNEL_CONTEXT_GET_INPUT, OrtStatus *(*)(const OrtKernelContext *, size_t, const OrtValue **))(ctx, i, &in[i]);
  int64_t dx[8], dq[8], ds[8];
  size_t rx, rq, rs;
  const size_t nx = dims_of(in[0], dx, &rx);
  dims_of(in[1], dq, &rq);
  dims_of(in[2], ds, &rs);
  if (rx == 0 || rq != 2 || rs != 2 || ds[0] != dq[0]) return fail("Q8MatMul: Q must be [R, C] and S [R, C/block]");
  const size_t r = (size_t)dq[0], c = (size_t)dq[1], nb = (size_t)ds[1], k = (size_t)dx[rx - 1];
  if (!q8_valid(r, c, nb)) return fail("Q8MatMul: C must be a multiple of the block count, with blocks of a multiple of 16");
  if (k != (trans ? c : r)) return fail("Q8MatMul: the last axis of X does not match the weight");
  int64_t dy[8];
  memcpy(dy, dx, sizeof dy);
  dy[rx - 1] = (int64_t)(trans ? r : c);
  OrtValue *outv = NULL;
  ORT_FN(ORT_KERNEL_CONTEXT_GET_OUTPUT, OrtStatus *(*)(OrtKernelContext *, size_t, const int64_t *, size_t, OrtValue **))(
      ctx, 0, dy, rx, &outv);
  if (!outv) return fail("Q8MatMul: no output");
  const Q8Job job = {(const float *)data_of(in[0]), (const int8_t *)data_of(in[1]), (const float *)data_of(in[2]),
                     (float *)data_of(outv), k ? nx / k : 0, r, c, c / nb, trans};
  if (job.m == 0) return NULL;
  const size_t tasks = q8_tasks(&job);
  if (tasks == 1 || job.m < 4) {
    for (size_t t = 0; t < tasks; t++) q8_task((void *)&job, t);
    return NULL;
  }
  return ORT_FN(ORT_KERNEL_CONTEXT_PARALLEL_FOR,
                OrtStatus *(*)(const OrtKernelContext *, void (*)(void *, size_t), size_t, size_t, void *))(
      ctx, q8_task, tasks, 0, (void *)&job);
}
static OrtStatus *q8_create(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **kernel);
static const char *q8_name(const OrtCustomOp *op);
static int q8_input_type(const OrtCustomOp *op, size_t i) { (void)op; return i == 1 ? ONNX_INT8 : ONNX_FLOAT; }

static OrtCustomOp q8_matmul = CUSTOM_OP(q8_name, q8_input_type, input_count, q8_create, q8_compute);
static OrtCustomOp q8_matmul_trans_b = CUSTOM_OP(q8_name, q8_input_type, input_count, q8_create, q8_compute);
static const char *q8_name(const OrtCustomOp *op) { return op == &q8_matmul_trans_b ? "Q8MatMulTransB" : "Q8MatMul"; }
static OrtStatus *q8_create(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **kernel) {
  (void)api, (void)info;
  static int modes[2] = {0, 1};
  *kernel = &modes[op == &q8_matmul_trans_b];
  return NULL;
}


/* Q4MatMul (kernel state 0) and Q4MatMulOffset (1): X [..., K], P [N/16, K/32, 4, 16, 4] uint8,
 * S [K/32, N] fp16 (, C [K/32, N] fp16) -> Y [..., N]; Q8Linear (2): P [N/16, K/32, 8, 16, 4] (8-bit) */
static OrtStatus *q4_compute(void *kernel, OrtKernelContext *ctx) {
  const int mode = *(const int *)kernel, offsets = mode == 1, bits = mode == 2 ? 8 : 4;
  const OrtValue *in[4];
  for (size_t i = 0; i < 3u + (size_t)offsets; i++)
    ORT_FN(ORT_KERNEL_CONTEXT_GET_INPUT, OrtStatus *(*)(const OrtKernelContext *, size_t, const OrtValue **))(ctx, i, &in[i]);
  int64_t dx[8], dp[8], ds[8], dc[8];
  size_t rx, rp, rs, rc = 2;
  const size_t nx = dims_of(in[0], dx, &rx);
  dims_of(in[1], dp, &rp);
  dims_of(in[2], ds, &rs);
  if (rx == 0 || rp != 5 || dp[2] != bits || dp[3] != 16 || dp[4] != 4)
    return fail(bits == 8 ? "Q8Linear: P must be [N/16, K/32, 8, 16, 4]" : "Q4MatMul: P must be [N/16, K/32, 4, 16, 4]");
  const size_t n = (size_t)dp[0] * 16, nb = (size_t)dp[1], k = (size_t)dx[rx - 1];
  if (rs != 2 || (size_t)ds[0] != nb || (size_t)ds[1] != n) return fail("Q4MatMul: S must be [K/32, N]");
  if (offsets) {
    dims_of(in[3], dc, &rc);
    if (rc != 2 || dc[0] != ds[0] || dc[1] != ds[1]) return fail("Q4MatMulOffset: C must be [K/32, N]");
  }
  if (k != nb * Q4_BLOCK || !q4_valid(k, n)) return fail("Q4MatMul: the last axis of X does not match the weight");
  int64_t dy[8];
  memcpy(dy, dx, sizeof dy);
  dy[rx - 1] = (int64_t)n;
  OrtValue *outv = NULL;
  ORT_FN(ORT_KERNEL_CONTEXT_GET_OUTPUT, OrtStatus *(*)(OrtKernelContext *, size_t, const int64_t *, size_t, OrtValue **))(
      ctx, 0, dy, rx, &outv);
  if (!outv) return fail("Q4MatMul: no output");
  Q4Job jb = {(const float *)data_of(in[0]), (const uint8_t *)data_of(in[1]), (const uint16_t *)data_of(in[2]),
              offsets ? (const uint16_t *)data_of(in[3]) : NULL, (float *)data_of(outv), nx / k, k, n, nb, {0}, bits};
  if (jb.m == 0) return NULL;
  float stack[Q4_STACK / sizeof(float)];
  if (q4_alloc(&jb, stack)) return fail("Q4MatMul: out of memory");
  typedef OrtStatus *(*ParallelFor)(const OrtKernelContext *, void (*)(void *, size_t), size_t, size_t, void *);
  OrtStatus *st = NULL;
  const size_t qt = (jb.m + 15) / 16, tasks = q4_tasks(&jb);
  if (qt == 1)
    q4_quantize_task(&jb, 0);
  else
    st = ORT_FN(ORT_KERNEL_CONTEXT_PARALLEL_FOR, ParallelFor)(ctx, q4_quantize_task, qt, 0, (void *)&jb);
  if (!st) {
    if (tasks == 1)
      q4_task(&jb, 0);
    else
      st = ORT_FN(ORT_KERNEL_CONTEXT_PARALLEL_FOR, ParallelFor)(ctx, q4_task, tasks, 0, (void *)&jb);
  }
  q4_release(&jb, stack);
  return st;
}
static OrtStatus *q4_create(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **kernel);
static const char *q4_name(const OrtCustomOp *op);
static int q4_input_type(const OrtCustomOp *op, size_t i) {
  (void)op;
  return i == 0 ? ONNX_FLOAT : i == 1 ? ONNX_UINT8 : ONNX_FLOAT16;
}
static size_t q4_input_count(const OrtCustomOp *op);

static OrtCustomOp q4_matmul = CUSTOM_OP(q4_name, q4_input_type, q4_input_count, q4_create, q4_compute);
static OrtCustomOp q4_matmul_offset = CUSTOM_OP(q4_name, q4_input_type, q4_input_count, q4_create, q4_compute);
static OrtCustomOp q8_linear = CUSTOM_OP(q4_name, q4_input_type, q4_input_count, q4_create, q4_compute);
static const char *q4_name(const OrtCustomOp *op) {
  return op == &q4_matmul_offset ? "Q4MatMulOffset" : op == &q8_linear ? "Q8Linear" : "Q4MatMul";
}
static size_t q4_input_count(const OrtCustomOp *op) { return op == &q4_matmul_offset ? 4 : 3; }
static OrtStatus *q4_create(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **kernel) {
  (void)api, (void)info;
  static int modes[3] = {0, 1, 2};
  *kernel = &modes[op == &q4_matmul_offset ? 1 : op == &q8_linear ? 2 : 0];
  return NULL;
}

/* ---- Attention: GroupQueryAttention (com.microsoft) with one token's decode step in C ----
 *
 * Attention(QKV [B, S, (H + 2 G) D], past_key/value [B, G, L, D], seqlens_k [B] int32, total_len int32,
 * cos/sin [P, D/2]) -> (out [B, S, H D], present_key/value): the graph's attention node. One token of one
 * sequence whose cache is appended in place (present bound to past's buffer, as the engine's decode loop
 * does) runs here: rotary (non-interleaved) on q and k, k and v written at position seqlens_k, softmax
 * attention of each query head over the positions so far, one task per key/value head. Everything else
 * (prompts, batches, separate caches) calls onnxruntime's own GroupQueryAttention kernel (InvokeOp). */
typedef struct OrtOp OrtOp;
typedef struct OrtOpAttr OrtOpAttr;
typedef struct {
  OrtOp *gqa; /* onnxruntime's kernel, for what the decode path does not take */
  int64_t heads, kv_heads, rotary, interleaved;
  float scale;
} AttnKernel;

typedef struct {
  const float *qkv, *cos, *sin;
  float *k, *v, *out, *scratch; /* scratch: heads x (pos + 1) scores */
  size_t heads, groups, dim, cap, pos;
  float scale;
} AttnJob;

static void rotate(const float *x, const float *c, const float *s, size_t half, float *y) {
  for (size_t i = 0; i < half; i++) {
    const float a = x[i], b = x[i + half];
    y[i] = a * c[i] - b * s[i];
    y[i + half] = b * c[i] + a * s[i];
  }
}

/* exp(x) for x <= 0 (softmax after the max is taken off), in a form the compiler vectorizes: x = n ln2 + r,
 * 2^n from the exponent bits, e^r by a degree-6 polynomial (relative error ~2e-7); below -87 it is 0. */
static inline float exp_neg(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = __builtin_roundf(x * 1.44269504f);
  const float r = x - n * 0.693145752f - n * 1.42860677e-6f;
  float p = 1.38888889e-3f;
  p = p * r + 8.33333333e-3f;
  p = p * r + 4.16666667e-2f;
  p = p * r + 1.66666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  union { int32_t i; float f; } u = {.i = ((int32_t)n + 127) << 23};
  return p * u.f;
}

/* dot product of two float vectors of length d (a multiple of 16: 16 partial sums the compiler vectorizes) */
static inline float dot16(const float *a, const float *b, size_t d) {
  float part[16] = {0};
  for (size_t i = 0; i < d; i += 16)
    for (size_t l = 0; l < 16; l++) part[l] += a[i + l] * b[i + l];
  float sum = 0.0f;
  for (size_t l = 0; l < 16; l++) sum += part[l];
  return sum;
}

#define ATTN_MAX_DIM 256
#define ATTN_MAX_GROUP 16
static void attend_group(void *arg, size_t g) {
  const AttnJob *j = (const AttnJob *)arg;
  const size_t d = j->dim, half = d / 2, r = j->heads / j->groups, t_len = j->pos + 1;
  const float *c = j->cos + j->pos * half, *s = j->sin + j->pos * half;
  float *kc = j->k + g * j->cap * d, *vc = j->v + g * j->cap * d;
  rotate(j->qkv + (j->heads + g) * d, c, s, half, kc + j->pos * d);
  memcpy(vc + j->pos * d, j->qkv + (j->heads + j->groups + g) * d, d * sizeof(float));
  float q[ATTN_MAX_GROUP][ATTN_MAX_DIM];
  for (size_t h = 0; h < r; h++) rotate(j->qkv + (g * r + h) * d, c, s, half, q[h]);
  float *p = j->scratch + g * r * t_len;
  for (size_t t = 0; t < t_len; t++) {
    const float *kt = kc + t * d;
    for (size_t h = 0; h < r; h++) p[h * t_len + t] = dot16(q[h], kt, d) * j->scale;
  }
  for (size_t h = 0; h < r; h++) {
    float *ph = p + h * t_len, m = ph[0], sum = 0.0f;
    for (size_t t = 1; t < t_len; t++) m = ph[t] > m ? ph[t] : m;
    for (size_t t = 0; t < t_len; t++) ph[t] = exp_neg(ph[t] - m);
    for (size_t t = 0; t < t_len; t++) sum += ph[t];
    const float inv = 1.0f / sum;
    float *o = j->out + (g * r + h) * d;
    float acc[ATTN_MAX_DIM] = {0};
    for (size_t t = 0; t < t_len; t++) {
      const float w = ph[t] * inv, *vt = vc + t * d;
      for (size_t i = 0; i < d; i++) acc[i] += w * vt[i];
    }
    memcpy(o, acc, d * sizeof(float));
  }
}

static OrtStatus *attn_compute(void *kernel, OrtKernelContext *ctx) {
  const AttnKernel *ak = (const AttnKernel *)kernel;
  typedef OrtStatus *(*GetInput)(const OrtKernelContext *, size_t, const OrtValue **);
  typedef OrtStatus *(*GetOutput)(OrtKernelContext *, size_t, const int64_t *, size_t, OrtValue **);
  const OrtValue *in[7];
  for (size_t i = 0; i < 7; i++) ORT_FN(ORT_KERNEL_CONTEXT_GET_INPUT, GetInput)(ctx, i, &in[i]);
  int64_t dq[8], dk[8], dc[8], ds[8];
  size_t rq, rk, rc, rs;
  dims_of(in[0], dq, &rq);
  dims_of(in[1], dk, &rk);
  dims_of(in[5], dc, &rc);
  dims_of(in[3], ds, &rs);
  const size_t heads = (size_t)ak->heads, groups = (size_t)ak->kv_heads;
  if (rq != 3 || rk != 4 || rc != 2 || rs != 1 || groups == 0 || heads % groups || (size_t)dk[1] != groups)
    return fail("Attention: QKV must be [B, S, (H + 2 G) D] and the caches [B, G, L, D]");
  const size_t d = (size_t)dk[3], b = (size_t)dq[0], seq = (size_t)dq[1];
  const int32_t total = *(const int32_t *)data_of(in[4]);
  const int64_t present_len = dk[2] > total ? dk[2] : total;
  int64_t dout[3] = {dq[0], dq[1], (int64_t)(heads * d)}, dpres[4] = {dk[0], dk[1], present_len, dk[3]};
  OrtValue *out[3] = {NULL, NULL, NULL};
  ORT_FN(ORT_KERNEL_CONTEXT_GET_OUTPUT, GetOutput)(ctx, 0, dout, 3, &out[0]);
  ORT_FN(ORT_KERNEL_CONTEXT_GET_OUTPUT, GetOutput)(ctx, 1, dpres, 4, &out[1]);
  ORT_FN(ORT_KERNEL_CONTEXT_GET_OUTPUT, GetOutput)(ctx, 2, dpres, 4, &out[2]);
  if (!out[0] || !out[1] || !out[2]) return fail("Attention: no output");
  const int32_t pos = *(const int32_t *)data_of(in[3]);
  const int decode = b == 1 && seq == 1 && ak->rotary == 1 && ak->interleaved == 0 && d <= ATTN_MAX_DIM && d % 16 == 0 &&
                     heads / groups <= ATTN_MAX_GROUP && (size_t)dq[2] == (heads + 2 * groups) * d &&
                     (size_t)dc[1] * 2 == d && pos >= 0 && pos + 1 == total && pos < dk[2] && pos < dc[0] &&
                     data_of(in[1]) == data_of(out[1]) && data_of(in[2]) == data_of(out[2]);
  if (!decode) {
    const OrtValue *gin[9] = {in[0], NULL, NULL, in[1], in[2], in[3], in[4], in[5], in[6]};
    typedef OrtStatus *(*InvokeOp)(const OrtKernelContext *, const OrtOp *, const OrtValue *const *, int, OrtValue *const *, int);
    return ORT_FN(ORT_INVOKE_OP, InvokeOp)(ctx, ak->gqa, gin, 9, out, 3);
  }
  float stack[4096];
  const size_t need = heads * ((size_t)pos + 1);
  float *scratch = need <= 4096 ? stack : (float *)malloc(need * sizeof(float));
  if (!scratch) return fail("Attention: out of memory");
  const AttnJob job = {(const float *)data_of(in[0]), (const float *)data_of(in[5]), (const float *)data_of(in[6]),
                       (float *)data_of(out[1]), (float *)data_of(out[2]), (float *)data_of(out[0]), scratch,
                       heads, groups, d, (size_t)dk[2], (size_t)pos, ak->scale != 0.0f ? ak->scale : 1.0f / sqrtf((float)d)};
  OrtStatus *st = NULL;
  if (groups == 1)
    for (size_t g = 0; g < groups; g++) attend_group((void *)&job, g);
  else /* one task per key/value head on onnxruntime's pool */
    st = ORT_FN(ORT_KERNEL_CONTEXT_PARALLEL_FOR,
                OrtStatus *(*)(const OrtKernelContext *, void (*)(void *, size_t), size_t, size_t, void *))(
        ctx, attend_group, groups, 0, (void *)&job);
  if (scratch != stack) free(scratch);
  return st;
}

static OrtStatus *attn_create(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **kernel) {
  (void)op, (void)api;
  typedef OrtStatus *(*GetInt)(const OrtKernelInfo *, const char *, int64_t *);
  typedef OrtStatus *(*GetFloat)(const OrtKernelInfo *, const char *, float *);
  typedef void (*Release)(void *);
  AttnKernel *ak = (AttnKernel *)calloc(1, sizeof *ak);
  if (!ak) return fail("Attention: out of memory");
  const char *names[4] = {"num_heads", "kv_num_heads", "do_rotary", "rotary_interleaved"};
  int64_t *fields[4] = {&ak->heads, &ak->kv_heads, &ak->rotary, &ak->interleaved};
  OrtOpAttr *attrs[5] = {NULL};
  int count = 0;
  OrtStatus *st = NULL;
  typedef OrtStatus *(*CreateAttr)(const char *, const void *, int, int, OrtOpAttr **);
  for (int i = 0; i < 4; i++) {
    st = ORT_FN(ORT_KERNEL_INFO_GET_ATTRIBUTE_INT64, GetInt)(info, names[i], fields[i]);
    if (st) { /* absent: GroupQueryAttention's default (0) */
      ORT_FN(ORT_RELEASE_STATUS, Release)(st);
      *fields[i] = 0;
      continue;
    }
    st = ORT_FN(ORT_CREATE_OP_ATTR, CreateAttr)(names[i], fields[i], 1, 1 /* ORT_OP_ATTR_INT */, &attrs[count]);
    if (st) break;
    count++;
  }
  if (!st) {
    OrtStatus *sc = ORT_FN(ORT_KERNEL_INFO_GET_ATTRIBUTE_FLOAT, GetFloat)(info, "scale", &ak->scale);
    if (sc) {
      ORT_FN(ORT_RELEASE_STATUS, Release)(sc);
      ak->scale = 0.0f;
    } else {
      st = ORT_FN(ORT_CREATE_OP_ATTR, CreateAttr)("scale", &ak->scale, 1, 3 /* ORT_OP_ATTR_FLOAT */, &attrs[count]);
      if (!st) count++;
    }
  }
  if (!st) {
    const char *tnames[2] = {"T", "M"};
    const int tvalues[2] = {ONNX_FLOAT, ONNX_INT32};
    /* the signature of onnxruntime >= 1.13 (input and output counts before the result) */
    typedef OrtStatus *(*CreateOp)(const OrtKernelInfo *, const char *, const char *, int, const char **, const int *, int,
                                   const OrtOpAttr *const *, int, int, int, OrtOp **);
    st = ORT_FN(ORT_CREATE_OP, CreateOp)(info, "GroupQueryAttention", "com.microsoft", 1, tnames, tvalues, 2,
                                         (const OrtOpAttr *const *)attrs, count, 9, 3, &ak->gqa);
  }
  for (int i = 0; i < count; i++) ORT_FN(ORT_RELEASE_OP_ATTR, Release)(attrs[i]);
  if (st) {
    free(ak);
    return st;
  }
  *kernel = ak;
  return NULL;
}
static void attn_destroy(void *kernel) {
  AttnKernel *ak = (AttnKernel *)kernel;
  if (ak && ak->gqa) ORT_FN(ORT_RELEASE_OP, void (*)(OrtOp *))(ak->gqa);
  free(ak);
}
static const char *attn_name(const OrtCustomOp *op) { (void)op; return "Attention"; }
static int attn_input_type(const OrtCustomOp *op, size_t i) { (void)op; return i == 3 || i == 4 ? ONNX_INT32 : ONNX_FLOAT; }
static size_t attn_input_count(const OrtCustomOp *op) { (void)op; return 7; }
static size_t attn_output_count(const OrtCustomOp *op) { (void)op; return 3; }
static OrtCustomOp attention = {17, NULL, attn_name, op_provider, attn_input_type, attn_input_count, output_type,
                                attn_output_count, NULL, attn_destroy, required, required, required, one, one, one, one,
                                attn_create, attn_compute, NULL, one, last_version, no_pairs, free_pairs, no_pairs,
                                free_pairs};

/* called by onnxruntime (SessionOptions.register_custom_ops_library) */
OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
  ort = base->GetApi(ORT_API_VERSION_USED);
  if (!ort) return NULL; /* cannot report without a table; onnxruntime then inlines the function */
  OrtCustomOpDomain *domain = NULL;
  OrtStatus *st = ORT_FN(ORT_CREATE_CUSTOM_OP_DOMAIN, OrtStatus *(*)(const char *, OrtCustomOpDomain **))("edgefm.native", &domain);
  if (st) return st;
  const OrtCustomOp *ops[] = {&block_offset_add, &q8_matmul, &q8_matmul_trans_b, &attention, &q4_matmul, &q4_matmul_offset, &q8_linear};
  const size_t count = sizeof ops / sizeof ops[0] - (edgefm_q4_vector() ? 0 : 3);
  for (size_t i = 0; i < count; i++) {
    st = ORT_FN(ORT_CUSTOM_OP_DOMAIN_ADD, OrtStatus *(*)(OrtCustomOpDomain *, const OrtCustomOp *))(domain, ops[i]);
    if (st) return st;
  }
  return ORT_FN(ORT_ADD_CUSTOM_OP_DOMAIN, OrtStatus *(*)(OrtSessionOptions *, OrtCustomOpDomain *))(options, domain);
}
