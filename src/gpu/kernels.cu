// AnomalyCLIP anomaly head as CUDA kernels (see docs §5 and src/head.rs, the CPU reference).
//
// Compiled at start-up by NVRTC (src/gpu/mod.rs), so this file must stay self-contained: no
// #include, no C++ standard library. Every kernel is `extern "C"` so that its PTX/CUBIN symbol is
// the plain name that the host looks up (KERNEL_NAMES in src/gpu/mod.rs lists them; the CI test
// tests/gpu_kernels_compile.rs checks that each one is in the PTX).
//
// Data flow per frame (all on one stream, fp32, row-major):
//   head_tokens       tokens L x [grid*grid][dim] + global [dim] -> patch [grid*grid] (summed over
//                     the L layers, as the CPU head does), score
//   bilinear_resize   patch -> map_raw [size*size]     (grid -> size)
//   gauss_cols        map_raw -> tmp        (vertical 1-D Gaussian, scipy 'reflect' border)
//   gauss_rows        tmp -> map            (horizontal 1-D Gaussian)
//   bilinear_resize   map -> out [out_h*out_w]  (only when the frame size differs from size)
//   map_stats         out -> max, count(v >= thr), count(v not finite)
//   quantize_mask     out -> u8 map round(clamp(v,0,1)*255), binary mask (v >= thr ? 255 : 0)
//
// The pixel threshold has one meaning in the whole project: a pixel counts when v >= thr.

#define MAX_LAYERS 4
#define WARP 32
#define FULL_MASK 0xffffffffu

// Device pointers of up to MAX_LAYERS token layers, passed by value (kernel parameter space).
// Mirrors `TokenLayers` in src/gpu/mod.rs (#[repr(C)], four u64).
struct TokenLayers {
    const float* layer[MAX_LAYERS];
};

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// <x/|x|, w>; a zero vector gives 0 (probability 0.5), as in the CPU head; a vector holding NaN or
// infinity gives NaN (|x| is then NaN or infinite), so that it reaches the score or the map and
// the frame is rejected instead of scoring 0.5. Whole warp calls it.
__device__ __forceinline__ float normalised_dot(const float* __restrict__ x,
                                                const float* __restrict__ w, int dim, int lane) {
    float ss = 0.0f, dot = 0.0f;
    for (int i = lane; i < dim; i += WARP) {
        const float v = x[i];
        ss += v * v;
        dot += v * w[i];
    }
    ss = warp_sum(ss);
    dot = warp_sum(dot);
    const float n = sqrtf(ss);
    return n == 0.0f ? 0.0f : dot / n;
}

// (a) Token normalisation, dot with w = (t_a - t_n)/tau, sigmoid.
// One warp per token. Warp 0 is the global (class) token and writes the image score into
// scalars[0] (as float bits); warp 1 + j is patch j: patch[j] = sum over layers l (in order) of
// sigmoid(<x_lj/|x_lj|, w>).
extern "C" __global__ void head_tokens(const float* __restrict__ global, TokenLayers layers,
                                       int n_layers, int n_patches, int dim,
                                       const float* __restrict__ w,
                                       unsigned int* __restrict__ scalars,
                                       float* __restrict__ patch) {
    const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    const int lane = threadIdx.x % WARP;
    if (warp > n_patches) return;  // whole warps leave together: the shuffles stay full-mask

    if (warp == 0) {
        const float p = sigmoid(normalised_dot(global, w, dim, lane));
        if (lane == 0) scalars[0] = __float_as_uint(p);
        return;
    }
    const long long j = warp - 1;
    float acc = 0.0f;
    for (int l = 0; l < n_layers; ++l) {
        acc += sigmoid(normalised_dot(layers.layer[l] + (size_t)j * dim, w, dim, lane));
    }
    if (lane == 0) patch[j] = acc;
}

// torch.nn.functional.interpolate(mode="bilinear", align_corners=False) source index:
// s = max((dst + 0.5) * in/out - 0.5, 0); i0 = min(floor(s), in - 1); i1 = min(i0 + 1, in - 1);
// l1 = clamp(s - i0, 0, 1).
__device__ __forceinline__ void src_index(int dst, float scale, int in_size, int* i0, int* i1,
                                          float* l1) {
    const float s = fmaxf(scale * ((float)dst + 0.5f) - 0.5f, 0.0f);
    int i = (int)floorf(s);
    if (i > in_size - 1) i = in_size - 1;
    *i0 = i;
    *i1 = (i < in_size - 1) ? i + 1 : i;
    *l1 = fminf(fmaxf(s - (float)i, 0.0f), 1.0f);
}

// (b) and (d) Bilinear resize (align_corners=False, edge clamp, no antialias) of src
// (src_h x src_w) into dst (dst_h x dst_w). 2-D grid, one thread per output pixel; horizontal
// interpolation of the two source rows, then vertical, as the CPU head.
extern "C" __global__ void bilinear_resize(const float* __restrict__ src, int src_h, int src_w,
                                           float* __restrict__ dst, int dst_h, int dst_w) {
    const int x = blockIdx.x * blockDim.x + threadIdx.x;
    const int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= dst_w || y >= dst_h) return;
    int y0, y1, x0, x1;
    float ly1, lx1;
    src_index(y, (float)src_h / (float)dst_h, src_h, &y0, &y1, &ly1);
    src_index(x, (float)src_w / (float)dst_w, src_w, &x0, &x1, &lx1);
    const float ly0 = 1.0f - ly1, lx0 = 1.0f - lx1;
    const float* r0 = src + (size_t)y0 * src_w;
    const float* r1 = src + (size_t)y1 * src_w;
    const float a = lx0 * r0[x0] + lx1 * r0[x1];
    const float b = lx0 * r1[x0] + lx1 * r1[x1];
    dst[(size_t)y * dst_w + x] = ly0 * a + ly1 * b;
}

// scipy.ndimage mode='reflect' (half-sample symmetric, "d c b a | a b c d | d c b a"), valid for
// any offset, also when the radius exceeds the length (period 2n).
__device__ __forceinline__ int reflect_index(int i, int n) {
    const int period = 2 * n;
    i %= period;
    if (i < 0) i += period;
    return i < n ? i : period - 1 - i;
}

// (c1) Vertical pass of the separable Gaussian (scipy filters axis 0 first, then axis 1).
// Block (32, ty): a tile of 32 columns x tile_h output rows; the (tile_h + 2r) x 32 input tile
// and the 2r + 1 taps sit in dynamic shared memory. The taps are symmetric; the sum is taken as
// k[r]*in[y] + sum_t k[r+t]*(in[y-t] + in[y+t]), the CPU head's order.
extern "C" __global__ void gauss_cols(const float* __restrict__ src, float* __restrict__ dst,
                                      int h, int w, const float* __restrict__ taps, int radius,
                                      int tile_h) {
    extern __shared__ float shm[];
    const int n_taps = 2 * radius + 1;
    float* k = shm;
    float* tile = shm + n_taps;
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int tid = ty * blockDim.x + tx;
    const int n_threads = blockDim.x * blockDim.y;
    const int x = blockIdx.x * blockDim.x + tx;
    const int y0 = blockIdx.y * tile_h;

    for (int i = tid; i < n_taps; i += n_threads) k[i] = taps[i];
    const int rows = tile_h + 2 * radius;
    for (int r = ty; r < rows; r += blockDim.y) {
        const int sy = reflect_index(y0 - radius + r, h);
        tile[r * blockDim.x + tx] = (x < w) ? src[(size_t)sy * w + x] : 0.0f;
    }
    __syncthreads();
    if (x >= w) return;
    for (int r = ty; r < tile_h; r += blockDim.y) {
        const int y = y0 + r;
        if (y >= h) break;
        const float* c = tile + (r + radius) * blockDim.x + tx;  // centre tap
        float acc = k[radius] * c[0];
        for (int t = 1; t <= radius; ++t) {
            acc += k[radius + t] * (c[-t * (int)blockDim.x] + c[t * (int)blockDim.x]);
        }
        dst[(size_t)y * w + x] = acc;
    }
}

// (c2) Horizontal pass. One block per (row, segment of blockDim.x outputs); the segment plus its
// 2r apron (reflected at the borders) and the taps sit in dynamic shared memory.
extern "C" __global__ void gauss_rows(const float* __restrict__ src, float* __restrict__ dst,
                                      int h, int w, const float* __restrict__ taps, int radius) {
    extern __shared__ float shm[];
    const int n_taps = 2 * radius + 1;
    float* k = shm;
    float* tile = shm + n_taps;
    const int y = blockIdx.y;
    const int x0 = blockIdx.x * blockDim.x;
    const int n_tile = blockDim.x + 2 * radius;

    for (int i = threadIdx.x; i < n_taps; i += blockDim.x) k[i] = taps[i];
    const float* row = src + (size_t)y * w;
    for (int i = threadIdx.x; i < n_tile; i += blockDim.x) {
        tile[i] = row[reflect_index(x0 - radius + i, w)];
    }
    __syncthreads();
    const int x = x0 + threadIdx.x;
    if (x >= w || y >= h) return;
    const float* c = tile + threadIdx.x + radius;  // centre tap
    float acc = k[radius] * c[0];
    for (int t = 1; t <= radius; ++t) acc += k[radius + t] * (c[-t] + c[t]);
    dst[(size_t)y * w + x] = acc;
}

// Order-preserving map from float to unsigned (so atomicMax on unsigned is a float max).
__device__ __forceinline__ unsigned int float_key(float f) {
    const unsigned int b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// (e) Map maximum, number of values at or above thr (v >= thr) and number of NaN or infinite
// values (key 0 = empty or all NaN). Grid-stride loop, warp then block reduction, one atomic per
// block: scalars[1] = max key (see float_key), scalars[2] = count, scalars[3] = non-finite count.
// The results are independent of the order of the atomics, so they are deterministic.
// scalars[1..4] must be zero before the launch (the host memsets them).
extern "C" __global__ void map_stats(const float* __restrict__ map, int n, float thr,
                                     unsigned int* __restrict__ scalars) {
    __shared__ unsigned int s_max[32];
    __shared__ unsigned int s_cnt[32];
    __shared__ unsigned int s_bad[32];
    unsigned int key = 0, cnt = 0, bad = 0;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float v = map[i];
        if (v == v) key = max(key, float_key(v));  // NaN is ignored, as in the CPU head
        cnt += (v >= thr) ? 1u : 0u;
        bad += (fabsf(v) <= 3.402823466e+38f) ? 0u : 1u;  // false for NaN and +-inf
    }
    for (int o = WARP / 2; o > 0; o >>= 1) {
        key = max(key, __shfl_xor_sync(FULL_MASK, key, o));
        cnt += __shfl_xor_sync(FULL_MASK, cnt, o);
        bad += __shfl_xor_sync(FULL_MASK, bad, o);
    }
    const int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP;
    if (lane == 0) {
        s_max[wid] = key;
        s_cnt[wid] = cnt;
        s_bad[wid] = bad;
    }
    __syncthreads();
    if (wid == 0) {
        const int n_warps = (blockDim.x + WARP - 1) / WARP;
        key = lane < n_warps ? s_max[lane] : 0u;
        cnt = lane < n_warps ? s_cnt[lane] : 0u;
        bad = lane < n_warps ? s_bad[lane] : 0u;
        for (int o = WARP / 2; o > 0; o >>= 1) {
            key = max(key, __shfl_xor_sync(FULL_MASK, key, o));
            cnt += __shfl_xor_sync(FULL_MASK, cnt, o);
            bad += __shfl_xor_sync(FULL_MASK, bad, o);
        }
        if (lane == 0) {
            atomicMax(&scalars[1], key);
            atomicAdd(&scalars[2], cnt);
            atomicAdd(&scalars[3], bad);
        }
    }
}

// (f) u8 quantisation round(clamp(v, 0, 1) * 255) (round half away from zero, as Rust's
// f32::round) and the binary mask (v >= thr ? 255 : 0), in one pass.
extern "C" __global__ void quantize_mask(const float* __restrict__ map, int n, float thr,
                                         unsigned char* __restrict__ q,
                                         unsigned char* __restrict__ mask) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float v = map[i];
        const float c = fminf(fmaxf(v, 0.0f), 1.0f);
        q[i] = (unsigned char)roundf(c * 255.0f);
        mask[i] = (v >= thr) ? 255 : 0;
    }
}
