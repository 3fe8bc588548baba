/* Max pooling over the RoI partition on CPU, every level in one call, NaN-aware.
 *
 * Built on first use by spp_triton/native.py with the system C compiler (plain C99, no Python or
 * torch headers) and called through ctypes from spp_triton/cpu.py. The host side computes the bin
 * geometry (spp_triton.bins.roi_bin_edges, the one definition); this file only reads it.
 *
 * One call pools K RoIs on one contiguous [N, C, H, W] map. Per RoI, the levels come finest
 * first. A level is either pooled from the map, one bin across the channels at a time (the order
 * torchvision's CPU roi_pool uses, which reads this layout faster than a channel's whole window at
 * a time), or, when the host names a finer `source` level whose bins nest in it for this RoI
 * (checked here on the clamped edges), derived from that level's results already in the output
 * row: each window is then read once per source level, not once per level.
 *
 * Rules (shared with the Triton kernels and spp_triton.reference):
 *   - a bin's value is its maximum; ties go to the first maximal element in row-major order;
 *   - a bin holding a NaN gives NaN, and its argmax is its first NaN;
 *   - a bin clipped away (empty) gives 0 and argmax -1;
 *   - argmax is the int32 flat index h * W + w in the (image, channel) plane.
 * Row-major order within a bin is flat-index order, so a derived bin takes, among its non-empty
 * fine bins, the NaN or maximal one with the smallest argmax: the same element as direct pooling.
 *
 * Output: RoI r is written to row out_rows[r] (row r if out_rows is NULL; the caller passes
 * distinct rows inside the output) of `out` (and of `argmax`, if not NULL): for each level, a
 * block of C * bh * bw values at column `offset`, laid out [C, bh, bw].
 *
 * Memory safety: bin edges are clamped to the map here as well, a `source` must precede its level
 * and divide its bin counts (else the level is pooled from the map), a batch index outside
 * [0, N) stops the call with return value 1 before anything of that RoI is read, and a plane of
 * 2**31 - 1 elements or more (positions are int32) is refused with return value 2.
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
    int64_t source;                 /* index of an earlier, finer level to derive from, or -1 */
} spp_level;

static int64_t spp_clamp(int64_t v, int64_t lo, int64_t hi)
{
    return v < lo ? lo : (v > hi ? hi : v);
}

/* Whether, along one axis, coarse bin p spans fine bins [p * ratio, (p + 1) * ratio) exactly:
 * same first start and last end (consecutive bins touch or overlap, so their union is that). */
static int spp_nests(const int64_t *fine_lo, const int64_t *fine_hi, const int64_t *lo,
                     const int64_t *hi, int64_t bins, int64_t ratio, int64_t size)
{
    for (int64_t p = 0; p < bins; ++p) {
        if (spp_clamp(lo[p], 0, size) != spp_clamp(fine_lo[p * ratio], 0, size) ||
            spp_clamp(hi[p], 0, size) != spp_clamp(fine_hi[(p + 1) * ratio - 1], 0, size))
            return 0;
    }
    return 1;
}

#define SPP_CAT_(a, b) a##_##b
#define SPP_CAT(a, b) SPP_CAT_(a, b)
#define SPP_FN(name) SPP_CAT(name, SPP_TYPE_NAME)

#define SPP_SCALAR float
#define SPP_TYPE_NAME float32
#include "roi_max.c" /* this file again, for the kernel body below */
#undef SPP_SCALAR
#undef SPP_TYPE_NAME

#define SPP_SCALAR double
#define SPP_TYPE_NAME float64
#include "roi_max.c" /* this file again, for the kernel body below */
#undef SPP_SCALAR
#undef SPP_TYPE_NAME

#else /* the kernel, once per SPP_SCALAR */

/* One bin [h0, h1) x [w0, w1) of one plane (not empty), read once without data-dependent
 * branches (a select gcc turns into maxss, and a mask for the position: written as `?:` or `if`
 * it became a jump, which random data mispredicts): the maximum, its first position if `argmax`
 * is wanted, and whether a NaN was seen; only then (rare) a second pass finds the first NaN
 * while the bin is still in L1. */
static inline SPP_SCALAR SPP_FN(spp_bin_max)(const SPP_SCALAR *map, int64_t width, int64_t h0,
                                             int64_t h1, int64_t w0, int64_t w1, int32_t *argmax)
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

/* spp_bin_max with argmax on the same bin of 4 planes `stride` apart: four independent
 * compare-and-select chains (one chain is latency-bound); a NaN in any of them sends the four
 * to spp_bin_max. */
static inline void SPP_FN(spp_bin4_max)(const SPP_SCALAR *map, int64_t stride, int64_t width,
                                        int64_t h0, int64_t h1, int64_t w0, int64_t w1,
                                        SPP_SCALAR *out, int32_t *argmax, int64_t out_stride)
{
    /* scalars, not arrays: kept in registers (arrays made gcc spill every step) */
    const SPP_SCALAR *p0 = map, *p1 = map + stride, *p2 = map + 2 * stride, *p3 = map + 3 * stride;
    SPP_SCALAR b0 = -INFINITY, b1 = -INFINITY, b2 = -INFINITY, b3 = -INFINITY;
    int32_t a0 = (int32_t)(h0 * width + w0), a1 = a0, a2 = a0, a3 = a0;
    int nan = 0;
    for (int64_t h = h0; h < h1; ++h) {
        for (int32_t idx = (int32_t)(h * width + w0), end = (int32_t)(h * width + w1); idx < end;
             ++idx) {
            const SPP_SCALAR v0 = p0[idx], v1 = p1[idx], v2 = p2[idx], v3 = p3[idx];
            int32_t m;
            m = -(int32_t)(v0 > b0);
            a0 = (idx & m) | (a0 & ~m);
            b0 = v0 > b0 ? v0 : b0;
            m = -(int32_t)(v1 > b1);
            a1 = (idx & m) | (a1 & ~m);
            b1 = v1 > b1 ? v1 : b1;
            m = -(int32_t)(v2 > b2);
            a2 = (idx & m) | (a2 & ~m);
            b2 = v2 > b2 ? v2 : b2;
            m = -(int32_t)(v3 > b3);
            a3 = (idx & m) | (a3 & ~m);
            b3 = v3 > b3 ? v3 : b3;
            nan |= (v0 != v0) | (v1 != v1) | (v2 != v2) | (v3 != v3);
        }
    }
    if (nan) { /* rare: the first NaN, one plane at a time */
        for (int j = 0; j < 4; ++j)
            out[j * out_stride] = SPP_FN(spp_bin_max)(map + j * stride, width, h0, h1, w0, w1,
                                                      argmax + j * out_stride);
        return;
    }
    out[0] = b0, out[out_stride] = b1, out[2 * out_stride] = b2, out[3 * out_stride] = b3;
    argmax[0] = a0, argmax[out_stride] = a1, argmax[2 * out_stride] = a2;
    argmax[3 * out_stride] = a3;
}

/* The values alone (no argmax) of the same bin on 4 planes `stride` apart. */
static inline void SPP_FN(spp_bin4_max_values)(const SPP_SCALAR *map, int64_t stride,
                                               int64_t width, int64_t h0, int64_t h1, int64_t w0,
                                               int64_t w1, SPP_SCALAR *out, int64_t out_stride)
{
    const SPP_SCALAR *p0 = map, *p1 = map + stride, *p2 = map + 2 * stride, *p3 = map + 3 * stride;
    SPP_SCALAR b0 = -INFINITY, b1 = -INFINITY, b2 = -INFINITY, b3 = -INFINITY;
    int n0 = 0, n1 = 0, n2 = 0, n3 = 0;
    for (int64_t h = h0; h < h1; ++h) {
        for (int64_t idx = h * width + w0, end = h * width + w1; idx < end; ++idx) {
            const SPP_SCALAR v0 = p0[idx], v1 = p1[idx], v2 = p2[idx], v3 = p3[idx];
            b0 = v0 > b0 ? v0 : b0;
            b1 = v1 > b1 ? v1 : b1;
            b2 = v2 > b2 ? v2 : b2;
            b3 = v3 > b3 ? v3 : b3;
            n0 |= v0 != v0;
            n1 |= v1 != v1;
            n2 |= v2 != v2;
            n3 |= v3 != v3;
        }
    }
    out[0] = n0 ? (SPP_SCALAR)NAN : b0;
    out[out_stride] = n1 ? (SPP_SCALAR)NAN : b1;
    out[2 * out_stride] = n2 ? (SPP_SCALAR)NAN : b2;
    out[3 * out_stride] = n3 ? (SPP_SCALAR)NAN : b3;
}

/* One level of RoI r pooled from the map. */
static void SPP_FN(spp_pool_level)(const SPP_SCALAR *image, int64_t channels, int64_t height,
                                   int64_t width, const spp_level *lv, int64_t r, SPP_SCALAR *o,
                                   int32_t *a)
{
    const int64_t plane = height * width;
    const int64_t bh = lv->bins_h, bw = lv->bins_w, nbins = bh * bw;
    const int64_t *row_lo = lv->row_lo + r * bh, *row_hi = lv->row_hi + r * bh;
    const int64_t *col_lo = lv->col_lo + r * bw, *col_hi = lv->col_hi + r * bw;
    for (int64_t ph = 0; ph < bh; ++ph) {
        const int64_t h0 = spp_clamp(row_lo[ph], 0, height);
        const int64_t h1 = spp_clamp(row_hi[ph], h0, height);
        for (int64_t pw = 0; pw < bw; ++pw) {
            const int64_t w0 = spp_clamp(col_lo[pw], 0, width);
            const int64_t w1 = spp_clamp(col_hi[pw], w0, width);
            const int empty = h1 <= h0 || w1 <= w0;
            int64_t c = 0, i = ph * bw + pw;
            if (a && !empty) {
                for (; c + 4 <= channels; c += 4, i += 4 * nbins)
                    SPP_FN(spp_bin4_max)(image + c * plane, plane, width, h0, h1, w0, w1, o + i,
                                         a + i, nbins);
            } else if (!empty) {
                for (; c + 4 <= channels; c += 4, i += 4 * nbins)
                    SPP_FN(spp_bin4_max_values)(image + c * plane, plane, width, h0, h1, w0, w1,
                                                o + i, nbins);
            }
            for (; c < channels; ++c, i += nbins) {
                if (empty) {
                    o[i] = 0;
                    if (a)
                        a[i] = -1;
                } else {
                    o[i] = SPP_FN(spp_bin_max)(image + c * plane, width, h0, h1, w0, w1,
                                               a ? a + i : NULL);
                }
            }
        }
    }
}

/* One level of RoI r derived from the finer level `src` (results `fo`, `fa` in the same row). */
static void SPP_FN(spp_derive_level)(int64_t channels, int64_t height, int64_t width,
                                     const spp_level *lv, const spp_level *src, int64_t r,
                                     SPP_SCALAR *o, int32_t *a, const SPP_SCALAR *fo,
                                     const int32_t *fa)
{
    const int64_t bh = lv->bins_h, bw = lv->bins_w, nbins = bh * bw;
    const int64_t fh = src->bins_h, fw = src->bins_w, fbins = fh * fw;
    const int64_t rh = fh / bh, rw = fw / bw;
    const int64_t *row_lo = src->row_lo + r * fh, *row_hi = src->row_hi + r * fh;
    const int64_t *col_lo = src->col_lo + r * fw, *col_hi = src->col_hi + r * fw;
    int clipped = 0;
    for (int64_t i = 0; i < fh; ++i)
        clipped |= spp_clamp(row_hi[i], 0, height) <= spp_clamp(row_lo[i], 0, height);
    for (int64_t j = 0; j < fw; ++j)
        clipped |= spp_clamp(col_hi[j], 0, width) <= spp_clamp(col_lo[j], 0, width);
    if (!clipped) { /* the usual case, no fine bin clipped away: branch-free, two short passes */
        for (int64_t c = 0; c < channels; ++c) {
            const SPP_SCALAR *fc = fo + c * fbins;
            const int32_t *ac = fa ? fa + c * fbins : NULL;
            for (int64_t ph = 0; ph < bh; ++ph) {
                for (int64_t pw = 0; pw < bw; ++pw) {
                    SPP_SCALAR best = -INFINITY;
                    int nan = 0;
                    for (int64_t i = ph * rh; i < (ph + 1) * rh; ++i) {
                        for (int64_t j = pw * rw; j < (pw + 1) * rw; ++j) {
                            const SPP_SCALAR v = fc[i * fw + j];
                            best = v > best ? v : best;
                            nan |= v != v;
                        }
                    }
                    const int64_t bin = c * nbins + ph * bw + pw;
                    o[bin] = nan ? (SPP_SCALAR)NAN : best;
                    if (!a)
                        continue;
                    int32_t at = INT32_MAX;
                    for (int64_t i = ph * rh; i < (ph + 1) * rh; ++i) {
                        for (int64_t j = pw * rw; j < (pw + 1) * rw; ++j) {
                            const SPP_SCALAR v = fc[i * fw + j];
                            const int32_t cand = (nan ? v != v : v == best) ? ac[i * fw + j]
                                                                            : INT32_MAX;
                            at = cand < at ? cand : at;
                        }
                    }
                    a[bin] = at;
                }
            }
        }
        return;
    }
    for (int64_t c = 0; c < channels; ++c) {
        for (int64_t ph = 0; ph < bh; ++ph) {
            for (int64_t pw = 0; pw < bw; ++pw) {
                SPP_SCALAR best = -INFINITY;
                int64_t at = INT64_MAX;
                int any = 0, nan = 0;
                for (int64_t i = ph * rh; i < (ph + 1) * rh; ++i) {
                    if (spp_clamp(row_hi[i], 0, height) <= spp_clamp(row_lo[i], 0, height))
                        continue; /* an empty fine bin row holds nothing */
                    for (int64_t j = pw * rw; j < (pw + 1) * rw; ++j) {
                        if (spp_clamp(col_hi[j], 0, width) <= spp_clamp(col_lo[j], 0, width))
                            continue;
                        const int64_t f = c * fbins + i * fw + j;
                        const SPP_SCALAR v = fo[f];
                        const int64_t at_f = fa ? fa[f] : 0;
                        any = 1;
                        if (v != v) {
                            if (!nan || at_f < at) {
                                best = v;
                                at = at_f;
                            }
                            nan = 1;
                        } else if (!nan && (v > best || (v == best && at_f < at))) {
                            best = v;
                            at = at_f;
                        }
                    }
                }
                const int64_t bin = c * nbins + ph * bw + pw;
                o[bin] = any ? best : 0;
                if (a)
                    a[bin] = any ? (int32_t)at : -1;
            }
        }
    }
}

int SPP_FN(spp_roi_max)(const SPP_SCALAR *x, int64_t n_img, int64_t channels, int64_t height,
                        int64_t width, const int64_t *batch, int64_t n_rois,
                        const spp_level *levels, int64_t n_levels, SPP_SCALAR *out,
                        int32_t *argmax, int64_t row_width, const int64_t *out_rows)
{
    const int64_t plane = height * width;
    if (plane >= INT32_MAX) /* positions are int32 */
        return 2;
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
            SPP_SCALAR *o = out_row + lv->offset;
            int32_t *a = arg_row ? arg_row + lv->offset : NULL;
            const spp_level *src = NULL;
            if (lv->source >= 0 && lv->source < l) {
                src = &levels[lv->source];
                const int64_t rh = src->bins_h / lv->bins_h, rw = src->bins_w / lv->bins_w;
                if (rh * lv->bins_h != src->bins_h || rw * lv->bins_w != src->bins_w ||
                    !spp_nests(src->row_lo + r * src->bins_h, src->row_hi + r * src->bins_h,
                               lv->row_lo + r * lv->bins_h, lv->row_hi + r * lv->bins_h,
                               lv->bins_h, rh, height) ||
                    !spp_nests(src->col_lo + r * src->bins_w, src->col_hi + r * src->bins_w,
                               lv->col_lo + r * lv->bins_w, lv->col_hi + r * lv->bins_w,
                               lv->bins_w, rw, width))
                    src = NULL;
            }
            if (src)
                SPP_FN(spp_derive_level)(channels, height, width, lv, src, r, o, a,
                                         out_row + src->offset,
                                         arg_row ? arg_row + src->offset : NULL);
            else
                SPP_FN(spp_pool_level)(image, channels, height, width, lv, r, o, a);
        }
    }
    return 0;
}

/* The gradient of the forward above (and of the adaptive partition, whose argmax has the same
 * form): `grad` (zeroed [N, C, H, W]) += each output gradient at its argmax. Levels one after the
 * other, RoIs in order within a level (torchvision's _roi_pool_backward order for one level), in
 * one thread: deterministic. An argmax outside the plane (-1: empty bin) adds nothing. RoI r
 * reads row rows[r] (r if rows is NULL) of `grad_out` and `argmax`; return value 1: a batch
 * index outside [0, N), before anything of that RoI is written. */
int SPP_FN(spp_roi_max_backward)(const SPP_SCALAR *grad_out, const int32_t *argmax,
                                 int64_t row_width, const int64_t *rows, const int64_t *batch,
                                 int64_t n_rois, const spp_level *levels, int64_t n_levels,
                                 SPP_SCALAR *grad, int64_t n_img, int64_t channels,
                                 int64_t height, int64_t width)
{
    const int64_t plane = height * width;
    for (int64_t r = 0; r < n_rois; ++r)
        if (batch[r] < 0 || batch[r] >= n_img)
            return 1;
    for (int64_t l = 0; l < n_levels; ++l) {
        const int64_t nbins = levels[l].bins_h * levels[l].bins_w;
        for (int64_t r = 0; r < n_rois; ++r) {
            const int64_t row = rows ? rows[r] : r;
            const SPP_SCALAR *g = grad_out + row * row_width + levels[l].offset;
            const int32_t *a = argmax + row * row_width + levels[l].offset;
            SPP_SCALAR *image = grad + batch[r] * channels * plane;
            for (int64_t c = 0; c < channels; ++c) {
                SPP_SCALAR *map = image + c * plane;
                for (int64_t i = c * nbins; i < (c + 1) * nbins; ++i) {
                    if (a[i] >= 0 && a[i] < plane)
                        map[a[i]] += g[i];
                }
            }
        }
    }
    return 0;
}

#endif
