/* rankfold int8 kernels: plain C99, no allocation, no floating point.
 * Arithmetic: TFLite / CMSIS-NN requantization (see rankfold/cexport/arith.py, the golden model). */
#include "rankfold_kernels.h"

#include <string.h>

static int32_t srdhm(int32_t a, int32_t b)
{
    int64_t product = (int64_t)a * (int64_t)b;
    int64_t nudge = product >= 0 ? (1LL << 30) : (1 - (1LL << 30));
    if (a == INT32_MIN && b == INT32_MIN) {
        return INT32_MAX;
    }
    return (int32_t)((product + nudge) / (1LL << 31));
}

static int32_t rounding_divide_by_pow2(int32_t x, int exponent)
{
    int32_t mask = (int32_t)((1LL << exponent) - 1);
    int32_t remainder = x & mask;
    int32_t threshold = (mask >> 1) + (x < 0 ? 1 : 0);
    return (x >> exponent) + (remainder > threshold ? 1 : 0);
}

int32_t rf_requantize(int32_t x, int32_t multiplier, int32_t shift)
{
    int left = shift > 0 ? shift : 0;
    int right = shift > 0 ? 0 : -shift;
    int64_t scaled = (int64_t)x * ((int64_t)1 << left);
    if (scaled > INT32_MAX) {
        scaled = INT32_MAX;
    } else if (scaled < INT32_MIN) {
        scaled = INT32_MIN;
    }
    return rounding_divide_by_pow2(srdhm((int32_t)scaled, multiplier), right);
}

static int8_t clamp8(int32_t v, int32_t lo, int32_t hi)
{
    return (int8_t)(v < lo ? lo : (v > hi ? hi : v));
}

/* The i-th signed 4-bit weight of a packed array (two per byte, the first in the low nibble). */
static int32_t weight4(const int8_t *packed, size_t i)
{
    const uint8_t byte = (uint8_t)packed[i >> 1];
    const int32_t nibble = (i & 1) ? (byte >> 4) : (byte & 0x0F);
    return nibble > 7 ? nibble - 16 : nibble;
}

/* First and one-past-last kernel tap whose input row/column lies inside [0, size). */
static void tap_range(int origin, int dilation, int taps, int size, int *first, int *end)
{
    int lo = 0, hi = taps;
    while (lo < taps && origin + lo * dilation < 0) {
        ++lo;
    }
    while (hi > lo && origin + (hi - 1) * dilation >= size) {
        --hi;
    }
    *first = lo;
    *end = hi;
}

void rf_conv_s8(const rf_conv_params *p, const int8_t *in, int8_t *out)
{
    const int in_per_group = p->in_c / p->groups;
    const int out_per_group = p->out_c / p->groups;
    const int plane = p->in_h * p->in_w;
    const int taps = p->k_h * p->k_w;
    int oc, oy, ox, ic, ky, kx;
    for (oc = 0; oc < p->out_c; ++oc) {
        const int group = oc / out_per_group;
        const int8_t *w_oc = p->weight + (p->weight_bits == 8 ? (size_t)oc * in_per_group * taps : 0);
        const int8_t *x_group = in + (size_t)group * in_per_group * plane;
        for (oy = 0; oy < p->out_h; ++oy) {
            const int iy0 = oy * p->stride_h - p->pad_top;
            int ky_first, ky_end;
            tap_range(iy0, p->dil_h, p->k_h, p->in_h, &ky_first, &ky_end);
            for (ox = 0; ox < p->out_w; ++ox) {
                const int ix0 = ox * p->stride_w - p->pad_left;
                int kx_first, kx_end;
                int32_t acc = p->bias[oc];
                tap_range(ix0, p->dil_w, p->k_w, p->in_w, &kx_first, &kx_end);
                for (ic = 0; ic < in_per_group; ++ic) {
                    const int8_t *x_c = x_group + (size_t)ic * plane;
                    if (p->weight_bits == 8) {
                        const int8_t *w_c = w_oc + (size_t)ic * taps;
                        for (ky = ky_first; ky < ky_end; ++ky) {
                            const int8_t *x_row = x_c + (iy0 + ky * p->dil_h) * p->in_w;
                            const int8_t *w_row = w_c + ky * p->k_w;
                            for (kx = kx_first; kx < kx_end; ++kx) {
                                acc += ((int32_t)x_row[ix0 + kx * p->dil_w] - p->in_zp) * (int32_t)w_row[kx];
                            }
                        }
                    } else {
                        const size_t w_base = ((size_t)oc * in_per_group + ic) * taps;
                        for (ky = ky_first; ky < ky_end; ++ky) {
                            const int8_t *x_row = x_c + (iy0 + ky * p->dil_h) * p->in_w;
                            for (kx = kx_first; kx < kx_end; ++kx) {
                                acc += ((int32_t)x_row[ix0 + kx * p->dil_w] - p->in_zp) *
                                       weight4(p->weight, w_base + (size_t)(ky * p->k_w + kx));
                            }
                        }
                    }
                }
                out[((size_t)oc * p->out_h + oy) * p->out_w + ox] =
                    clamp8(rf_requantize(acc, p->multiplier[oc], p->shift[oc]) + p->out_zp, p->act_min, p->act_max);
            }
        }
    }
}

/* Dense int8 convolution, zero point folded into the bias: bias_folded[c] = bias[c] - in_zp * sum(w[c]).
 * A padded input is first copied into `scratch` with its borders at in_zp (the real value 0), so the
 * inner loops have no bounds checks; sum((x - zp) * w) = sum(x * w) - zp * sum(w) exactly. */
void rf_conv_dense_s8(const rf_conv_params *p, const int32_t *bias_folded, const int8_t *in, int8_t *out,
                      int8_t *scratch)
{
    const int padded = p->pad_top || p->pad_left || p->pad_bottom || p->pad_right;
    const int src_h = p->in_h + p->pad_top + p->pad_bottom;
    const int src_w = p->in_w + p->pad_left + p->pad_right;
    const int plane = src_h * src_w;
    const int taps = p->k_h * p->k_w;
    const int8_t *src = in;
    int offsets[RF_MAX_TAPS];
    int oc, oy, ox, ic, ky, kx;
    if (padded) {
        int c, y;
        memset(scratch, p->in_zp, (size_t)p->in_c * plane);
        for (c = 0; c < p->in_c; ++c) {
            for (y = 0; y < p->in_h; ++y) {
                memcpy(scratch + (size_t)c * plane + (size_t)(y + p->pad_top) * src_w + p->pad_left,
                       in + ((size_t)c * p->in_h + y) * p->in_w, (size_t)p->in_w);
            }
        }
        src = scratch;
    }
    {
        int t = 0;
        for (ky = 0; ky < p->k_h; ++ky) {
            for (kx = 0; kx < p->k_w; ++kx) {
                offsets[t++] = ky * p->dil_h * src_w + kx * p->dil_w;
            }
        }
    }
    for (oc = 0; oc < p->out_c; ++oc) {
        const int8_t *w_oc = p->weight + (size_t)oc * p->in_c * taps;
        int8_t *out_c = out + (size_t)oc * p->out_h * p->out_w;
        if (p->weight_bits == 4) { /* unpack this channel's weights once */
            int8_t *unpacked = scratch + (padded ? (size_t)p->in_c * plane : 0);
            const size_t base = (size_t)oc * p->in_c * taps;
            size_t i;
            for (i = 0; i < (size_t)p->in_c * taps; ++i) {
                unpacked[i] = (int8_t)weight4(p->weight, base + i);
            }
            w_oc = unpacked;
        }
        for (oy = 0; oy < p->out_h; ++oy) {
            for (ox = 0; ox < p->out_w; ++ox) {
                const int8_t *x_base = src + (size_t)oy * p->stride_h * src_w + (size_t)ox * p->stride_w;
                int32_t acc = bias_folded[oc];
                if (taps == 1) {
                    for (ic = 0; ic < p->in_c; ++ic) {
                        acc += (int32_t)x_base[(size_t)ic * plane] * w_oc[ic];
                    }
                } else if (p->k_h == 3 && p->k_w == 3 && p->dil_h == 1 && p->dil_w == 1) {
                    for (ic = 0; ic < p->in_c; ++ic) {
                        const int8_t *x0 = x_base + (size_t)ic * plane;
                        const int8_t *x1 = x0 + src_w;
                        const int8_t *x2 = x1 + src_w;
                        const int8_t *w = w_oc + ic * 9;
                        acc += x0[0] * w[0] + x0[1] * w[1] + x0[2] * w[2] + x1[0] * w[3] + x1[1] * w[4] +
                               x1[2] * w[5] + x2[0] * w[6] + x2[1] * w[7] + x2[2] * w[8];
                    }
                } else if (taps == 3) { /* Kx1 / 1xK: the factors of spatial SVD */
                    const int o1 = offsets[1], o2 = offsets[2];
                    for (ic = 0; ic < p->in_c; ++ic) {
                        const int8_t *x0 = x_base + (size_t)ic * plane;
                        const int8_t *w = w_oc + ic * 3;
                        acc += x0[0] * w[0] + x0[o1] * w[1] + x0[o2] * w[2];
                    }
                } else {
                    for (ic = 0; ic < p->in_c; ++ic) {
                        const int8_t *x_c = x_base + (size_t)ic * plane;
                        const int8_t *w_c = w_oc + (size_t)ic * taps;
                        int t;
                        for (t = 0; t < taps; ++t) {
                            acc += (int32_t)x_c[offsets[t]] * w_c[t];
                        }
                    }
                }
                out_c[oy * p->out_w + ox] =
                    clamp8(rf_requantize(acc, p->multiplier[oc], p->shift[oc]) + p->out_zp, p->act_min, p->act_max);
            }
        }
    }
}

void rf_add_s8(const int8_t *a, int32_t a_zp, int32_t a_mult, int32_t a_shift,
               const int8_t *b, int32_t b_zp, int32_t b_mult, int32_t b_shift,
               int8_t *out, int32_t out_zp, int32_t out_mult, int32_t out_shift,
               int32_t act_min, int32_t size)
{
    int32_t i;
    for (i = 0; i < size; ++i) {
        int32_t x = rf_requantize(((int32_t)a[i] - a_zp) * (1 << RF_ADD_LEFT_SHIFT), a_mult, a_shift);
        int32_t y = rf_requantize(((int32_t)b[i] - b_zp) * (1 << RF_ADD_LEFT_SHIFT), b_mult, b_shift);
        out[i] = clamp8(rf_requantize(x + y, out_mult, out_shift) + out_zp, act_min, 127);
    }
}

void rf_avgpool_s8(const int8_t *in, int32_t in_zp, int32_t channels, int32_t count,
                   int8_t *out, int32_t out_zp, int32_t mult, int32_t shift)
{
    int32_t c, i;
    for (c = 0; c < channels; ++c) {
        int32_t total = 0;
        for (i = 0; i < count; ++i) {
            total += (int32_t)in[c * count + i] - in_zp;
        }
        out[c] = clamp8(rf_requantize(total, mult, shift) + out_zp, -128, 127);
    }
}

void rf_requant_s8(const int8_t *in, int32_t in_zp, int8_t *out, int32_t out_zp, int32_t mult, int32_t shift,
                   int32_t act_min, int32_t size)
{
    int32_t i;
    for (i = 0; i < size; ++i) {
        out[i] = clamp8(rf_requantize((int32_t)in[i] - in_zp, mult, shift) + out_zp, act_min, 127);
    }
}
