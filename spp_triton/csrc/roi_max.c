/* Max pooling over the RoI partition on CPU, every level in one pass, NaN-aware.
 *
 * Built on first use by spp_triton/native.py with the system C compiler (plain C99, no Python or
 * torch headers) and called through ctypes from spp_triton/cpu.py. The host side computes the bin
 * geometry (spp_triton.bins.roi_bin_edges, the one definition); this file only reads it.
 *
 * One call pools K RoIs on one contiguous [N, C, H, W] map. For each RoI and channel, the RoI's
 * window is read from one (image, channel) plane, row by row, once per level; the levels follow
 * each other while that window is still in cache.
 *
 * Rules (shared with the Triton kernels and spp_triton.reference):
 *   - a bin's value is its maximum; ties go to the first maximal element in row-major order;
 *   - a bin holding a NaN gives NaN, and its argmax is its first NaN;
 *   - a bin clipped away (empty) gives 0 and argmax -1;
 *   - argmax is the int32 flat index h * W + w in the (image, channel) plane.
 *
 * Output: RoI r is written to row out_rows[r] (row r if out_rows is NULL; the caller passes
 * distinct rows inside the output) of `out` (and of `argmax`, if not NULL): for each level, a
 * block of C * bh * bw values at column `offset`, laid out [C, bh, bw].
 *
 * Memory safety: bin edges are clamped to the map here as well, and a batch index outside
 * [0, N) stops the call with return value 1 before anything of that RoI is read.
 */
#ifndef SPP_SCALAR

#include <math.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    int64_t bins_h, bins_w;
    const int64_t *row_lo, *row_hi; /* [K, bins_h]: rows [lo, hi) of each bin row */
    const int64_t *col_lo, *col_hi; /* [K, bins_w]: columns [lo, hi) of each bin column */
    int64_t offset;                 /* first column of the level's block in an output row */
} spp_level;

static int64_t spp_clamp(int64_t v, int64_t lo, int64_t hi)
{
    return v < lo ? lo : (v > hi ? hi : v);
}

#define SPP_SCALAR float
#define SPP_NAME spp_roi_max_float32
#define SPP_BIN spp_bin_max_float32
#define SPP_BIN4 spp_bin4_max_float32
#include __FILE__
#undef SPP_SCALAR
#undef SPP_NAME
#undef SPP_BIN
#undef SPP_BIN4

#define SPP_SCALAR double
#define SPP_NAME spp_roi_max_float64
#define SPP_BIN spp_bin_max_float64
#define SPP_BIN4 spp_bin4_max_float64
#include __FILE__
#undef SPP_SCALAR
#undef SPP_NAME
#undef SPP_BIN
#undef SPP_BIN4

#else /* the kernel, once per SPP_SCALAR */

/* One bin [h0, h1) x [w0, w1) of one plane (not empty), read once without data-dependent
 * branches (selects the compiler turns into max and conditional moves): the maximum, its first
 * position if `argmax` is wanted, and whether a NaN was seen; only then (rare) a second pass
 * finds the first NaN while the bin is still in L1. */
static inline SPP_SCALAR SPP_BIN(const SPP_SCALAR *map, int64_t width, int64_t h0, int64_t h1,
                                 int64_t w0, int64_t w1, int32_t *argmax)
{
    SPP_SCALAR best = -INFINITY;
    int nan = 0;
    if (!argmax) {
        for (int64_t h = h0; h < h1; ++h) {
            const SPP_SCALAR *row = map + h * width;
            for (int64_t w = w0; w < w1; ++w) {
                const SPP_SCALAR v = row[w];
                best = v > best ? v : best;
                nan |= v != v;
            }
        }
        return nan ? (SPP_SCALAR)NAN : best;
    }
    int64_t at = h0 * width + w0; /* a bin of -inf keeps its first element */
    for (int64_t h = h0; h < h1; ++h) {
        const SPP_SCALAR *row = map + h * width;
        for (int64_t w = w0; w < w1; ++w) {
            const SPP_SCALAR v = row[w];
            /* a mask, not a branch: compilers keep it branch-free (a ?: here became a jump) */
            const int64_t greater = -(int64_t)(v > best);
            at = ((h * width + w) & greater) | (at & ~greater);
            best = v > best ? v : best;
            nan |= v != v;
        }
    }
    if (nan) {
        for (int64_t h = h0; h < h1; ++h) {
            const SPP_SCALAR *row = map + h * width;
            for (int64_t w = w0; w < w1; ++w) {
                if (row[w] != row[w]) {
                    *argmax = (int32_t)(h * width + w);
                    return row[w];
                }
            }
        }
    }
    *argmax = (int32_t)at;
    return best;
}

/* SPP_BIN with argmax on 4 planes `stride` apart at once: four independent dependency chains
 * (the compare-and-select chain of one plane is latency-bound). */
static inline void SPP_BIN4(const SPP_SCALAR *map, int64_t stride, int64_t width, int64_t h0,
                            int64_t h1, int64_t w0, int64_t w1, SPP_SCALAR *out,
                            int32_t *argmax, int64_t out_stride)
{
    SPP_SCALAR best[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
    int64_t at[4];
    int nan[4] = {0, 0, 0, 0};
    for (int j = 0; j < 4; ++j)
        at[j] = h0 * width + w0;
    for (int64_t h = h0; h < h1; ++h) {
        for (int64_t w = w0; w < w1; ++w) {
            const int64_t idx = h * width + w;
            for (int j = 0; j < 4; ++j) {
                const SPP_SCALAR v = map[j * stride + idx];
                const int64_t greater = -(int64_t)(v > best[j]);
                at[j] = (idx & greater) | (at[j] & ~greater);
                best[j] = v > best[j] ? v : best[j];
                nan[j] |= v != v;
            }
        }
    }
    for (int j = 0; j < 4; ++j) {
        if (nan[j]) { /* rare: the first NaN, by the one-plane path */
            out[j * out_stride] = SPP_BIN(map + j * stride, width, h0, h1, w0, w1,
                                          argmax + j * out_stride);
        } else {
            out[j * out_stride] = best[j];
            argmax[j * out_stride] = (int32_t)at[j];
        }
    }
}

int SPP_NAME(const SPP_SCALAR *x, int64_t n_img, int64_t channels, int64_t height, int64_t width,
             const int64_t *batch, int64_t n_rois, const spp_level *levels, int64_t n_levels,
             SPP_SCALAR *out, int32_t *argmax, int64_t row_width, const int64_t *out_rows)
{
    const int64_t plane = height * width;
    for (int64_t r = 0; r < n_rois; ++r) {
        const int64_t b = batch[r];
        if (b < 0 || b >= n_img)
            return 1;
        const int64_t row = out_rows ? out_rows[r] : r;
        SPP_SCALAR *out_row = out + row * row_width;
        int32_t *arg_row = argmax ? argmax + row * row_width : NULL;
        const SPP_SCALAR *image = x + b * channels * plane;
        for (int64_t l = 0; l < n_levels; ++l) {
            const spp_level *lv = &levels[l];
            const int64_t bh = lv->bins_h, bw = lv->bins_w, nbins = bh * bw;
            const int64_t *row_lo = lv->row_lo + r * bh, *row_hi = lv->row_hi + r * bh;
            const int64_t *col_lo = lv->col_lo + r * bw, *col_hi = lv->col_hi + r * bw;
            SPP_SCALAR *o = out_row + lv->offset;
            int32_t *a = arg_row ? arg_row + lv->offset : NULL;
            for (int64_t ph = 0; ph < bh; ++ph) {
                const int64_t h0 = spp_clamp(row_lo[ph], 0, height);
                const int64_t h1 = spp_clamp(row_hi[ph], h0, height);
                for (int64_t pw = 0; pw < bw; ++pw) {
                    const int64_t w0 = spp_clamp(col_lo[pw], 0, width);
                    const int64_t w1 = spp_clamp(col_hi[pw], w0, width);
                    const int empty = h1 <= h0 || w1 <= w0;
                    /* one bin across the channels, as torchvision orders it: on this layout
                     * that reads memory faster than a channel's whole window at a time */
                    int64_t c = 0, i = ph * bw + pw;
                    if (a && !empty) {
                        for (; c + 4 <= channels; c += 4, i += 4 * nbins)
                            SPP_BIN4(image + c * plane, plane, width, h0, h1, w0, w1, o + i,
                                     a + i, nbins);
                    }
                    for (; c < channels; ++c, i += nbins) {
                        if (empty) {
                            o[i] = 0;
                            if (a)
                                a[i] = -1;
                        } else {
                            o[i] = SPP_BIN(image + c * plane, width, h0, h1, w0, w1,
                                           a ? a + i : NULL);
                        }
                    }
                }
            }
        }
    }
    return 0;
}

#endif
