/* edgefm native kernel: the offset term of the asymmetric 4-bit recipe, as an onnxruntime custom op.
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
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__F16C__) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
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
  ORT_KERNEL_CONTEXT_GET_INPUT = 90,
  ORT_KERNEL_CONTEXT_GET_OUTPUT = 91,
  ORT_RELEASE_TENSOR_TYPE_AND_SHAPE_INFO = 99,
  ORT_KERNEL_CONTEXT_PARALLEL_FOR = 274, /* API version 17 on */
};
#define ORT_API_VERSION_USED 17 /* onnxruntime >= 1.17 */
#define ONNX_FLOAT 1
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

/* ---- the onnxruntime custom op around it ---- */

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

static OrtCustomOp block_offset_add = {
    17, NULL, op_name, op_provider, input_type, input_count, output_type, output_count, NULL, destroy_kernel,
    required, required, required, one, one, one, one, create_kernel, compute, NULL, one, last_version,
    no_pairs, free_pairs, no_pairs, free_pairs,
};

/* called by onnxruntime (SessionOptions.register_custom_ops_library) */
OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
  ort = base->GetApi(ORT_API_VERSION_USED);
  if (!ort) return NULL; /* cannot report without a table; onnxruntime then inlines the function */
  OrtCustomOpDomain *domain = NULL;
  OrtStatus *st = ORT_FN(ORT_CREATE_CUSTOM_OP_DOMAIN, OrtStatus *(*)(const char *, OrtCustomOpDomain **))("edgefm.native", &domain);
  if (st) return st;
  st = ORT_FN(ORT_CUSTOM_OP_DOMAIN_ADD, OrtStatus *(*)(OrtCustomOpDomain *, const OrtCustomOp *))(domain, &block_offset_add);
  if (st) return st;
  return ORT_FN(ORT_ADD_CUSTOM_OP_DOMAIN, OrtStatus *(*)(OrtSessionOptions *, OrtCustomOpDomain *))(options, domain);
}
