/* rankfold int8 kernels. Arithmetic: TFLite / CMSIS-NN requantization (rankfold/cexport/arith.py,
 * the golden model). Activations are NCHW, one sample.
 *
 * Dense convolutions and fully connected layers (rf_conv_im2col_s8): two output pixels at a time,
 * their receptive fields are copied as int16 (x - zero point, 0 in the padding: no padded copy of
 * the input) into two columns, then every output channel pair takes the dot products with both
 * columns, two multiply-accumulates per instruction (SMLAD). The weights were interleaved by the
 * code generator so that sign-extending a word of them (SXTB16) gives pairs in column order.
 * Depthwise convolutions (rf_depthwise_s8): one channel at a time, the zero point folded into the
 * bias inside the image and the taps clipped at its borders. */
#include "rankfold_kernels.h"

#include <string.h>

#if defined(__ARM_FEATURE_DSP) && __ARM_FEATURE_DSP
#include <arm_acle.h>
#define RF_SXTB16(x) ((uint32_t)__sxtb16(x))
/* gcc 12 emits the rotation as an instruction of its own; SXTB16 rotates for free */
static inline uint32_t rf_sxtb16_ror8(uint32_t x)
{
    uint32_t r;
    __asm("sxtb16 %0, %1, ror #8" : "=r"(r) : "r"(x));
    return r;
}
#define RF_SXTB16_ROR8(x) rf_sxtb16_ror8(x)
#define RF_SMLAD(a, b, acc) __smlad((a), (b), (acc))
#define RF_SMLABB(a, b, acc) __smlabb((int32_t)(a), (int32_t)(b), (acc))
#define rf_sub16(a, b) ((uint32_t)__ssub16((a), (b))) /* two halfword subtractions, no saturation */
#define RF_SMLATB(a, b, acc) __smlatb((int32_t)(a), (int32_t)(b), (acc))
#else
/* Bytes 0 and 2 sign-extended into the low and high halfwords. */
static inline uint32_t rf_sxtb16(uint32_t x)
{
    return (uint32_t)(uint16_t)(int16_t)(int8_t)(x & 0xFFu) |
           ((uint32_t)(uint16_t)(int16_t)(int8_t)((x >> 16) & 0xFFu) << 16);
}
static inline int32_t rf_smlad(uint32_t a, uint32_t b, int32_t acc)
{
    return acc + (int32_t)(int16_t)(a & 0xFFFFu) * (int16_t)(b & 0xFFFFu) +
           (int32_t)(int16_t)(a >> 16) * (int16_t)(b >> 16);
}
static inline uint32_t rf_sub16(uint32_t a, uint32_t b)
{
    return ((a - b) & 0xFFFFu) | (((a >> 16) - (b >> 16)) << 16);
}
#define RF_SXTB16(x) rf_sxtb16(x)
#define RF_SXTB16_ROR8(x) rf_sxtb16(((x) >> 8) | ((x) << 24))
#define RF_SMLAD(a, b, acc) rf_smlad((a), (b), (acc))
/* Bottom (low) or top (high) halfword of a, times the bottom halfword of b, added to acc. */
#define RF_SMLABB(a, b, acc) ((acc) + (int32_t)(int16_t)((a) & 0xFFFFu) * (int16_t)((b) & 0xFFFFu))
#define RF_SMLATB(a, b, acc) ((acc) + (int32_t)(int16_t)((uint32_t)(a) >> 16) * (int16_t)((b) & 0xFFFFu))
#endif

static inline uint32_t read32(const void *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline int8_t clamp8(int32_t v, int32_t lo, int32_t hi)
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

/* The left shift saturates: x scaled to INT32_MAX or INT32_MIN, then the high multiply. */
#if defined(__GNUC__)
__attribute__((noinline))
#endif
int32_t rf_requantize_saturated(int32_t x, int32_t multiplier, int32_t left)
{
    const int32_t scaled = x > 0 ? INT32_MAX : INT32_MIN;
    (void)left;
    return (int32_t)(((int64_t)scaled * multiplier + ((int64_t)1 << 30)) >> 31);
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

/* Generic convolution (any groups, any kernel): the reference the fast kernels are measured by. */
void rf_conv_s8(const rf_conv_params *p, const int8_t *in, int8_t *out)
{
    const int in_per_group = p->in_c / p->groups;
    const int out_per_group = p->out_c / p->groups;
    const int plane = p->in_h * p->in_w;
    const int taps = p->k_h * p->k_w;
    int oc, oy, ox, ic, ky, kx;
    for (oc = 0; oc < p->out_c; ++oc) {
        const int group = oc / out_per_group;
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
                    const size_t w_base = ((size_t)oc * in_per_group + ic) * taps;
                    for (ky = ky_first; ky < ky_end; ++ky) {
                        const int8_t *x_row = x_c + (iy0 + ky * p->dil_h) * p->in_w;
                        for (kx = kx_first; kx < kx_end; ++kx) {
                            const size_t w_i = w_base + (size_t)(ky * p->k_w + kx);
                            const int32_t w = p->weight_bits == 8 ? p->weight[w_i] : weight4(p->weight, w_i);
                            acc += ((int32_t)x_row[ix0 + kx * p->dil_w] - p->in_zp) * w;
                        }
                    }
                }
                out[((size_t)oc * p->out_h + oy) * p->out_w + ox] =
                    clamp8(rf_requantize(acc, p->multiplier[oc], p->shift[oc]) + p->out_zp, p->act_min, p->act_max);
            }
        }
    }
}

/* Output pixel `pixel`'s receptive field as int16 (x - zero point; 0 where it falls in the padding),
 * followed by zeros up to the row length. */
static void im2col(const rf_conv_params *p, const int8_t *in, int pixel, int16_t *col, int row_len)
{
    const int plane = p->in_h * p->in_w;
    const int zp = p->in_zp;
    int16_t *c = col;
    int ic;
    if (plane == 1 && p->k_h == 1 && p->k_w == 1) { /* a fully connected layer: four values a word */
        const uint32_t zp2 = ((uint32_t)(uint16_t)zp << 16) | (uint16_t)zp;
        for (ic = 0; ic + 3 < p->in_c; ic += 4) {
            const uint32_t x = read32(in + ic);
            const uint32_t even = RF_SXTB16(x), odd = RF_SXTB16_ROR8(x); /* (x0, x2), (x1, x3) */
            const uint32_t lo = (even & 0xFFFFu) | (odd << 16), hi = (odd & 0xFFFF0000u) | (even >> 16);
            const uint32_t out[2] = {rf_sub16(lo, zp2), rf_sub16(hi, zp2)};
            memcpy(c, out, 8);
            c += 4;
        }
        for (; ic < p->in_c; ++ic) {
            *c++ = (int16_t)(in[ic] - zp);
        }
    } else if (p->k_h == 1 && p->k_w == 1 && p->pad_top == 0 && p->pad_left == 0) {
        const int oy = pixel / p->out_w, ox = pixel - oy * p->out_w;
        const int8_t *x = in + (size_t)oy * p->stride_h * p->in_w + (size_t)ox * p->stride_w;
        for (ic = 0; ic < p->in_c; ++ic) {
            *c++ = (int16_t)(x[(size_t)ic * plane] - zp);
        }
    } else {
        const int oy = pixel / p->out_w, ox = pixel - oy * p->out_w;
        const int iy0 = oy * p->stride_h - p->pad_top, ix0 = ox * p->stride_w - p->pad_left;
        const int row_inside = ix0 >= 0 && ix0 + (p->k_w - 1) * p->dil_w < p->in_w;
        int ky, kx;
        for (ic = 0; ic < p->in_c; ++ic) {
            const int8_t *x_c = in + (size_t)ic * plane;
            for (ky = 0; ky < p->k_h; ++ky) {
                const int iy = iy0 + ky * p->dil_h;
                if (iy < 0 || iy >= p->in_h) {
                    for (kx = 0; kx < p->k_w; ++kx) {
                        *c++ = 0;
                    }
                } else if (row_inside) {
                    const int8_t *x = x_c + (size_t)iy * p->in_w + ix0;
                    for (kx = 0; kx < p->k_w; ++kx) {
                        *c++ = (int16_t)(x[kx * p->dil_w] - zp);
                    }
                } else {
                    const int8_t *x = x_c + (size_t)iy * p->in_w;
                    for (kx = 0; kx < p->k_w; ++kx) {
                        const int ix = ix0 + kx * p->dil_w;
                        *c++ = (int16_t)(ix >= 0 && ix < p->in_w ? x[ix] - zp : 0);
                    }
                }
            }
        }
    }
    while (c < col + row_len) {
        *c++ = 0;
    }
}

/* Dot products of two weight rows (w0, w1) with two columns (c0, c1): acc[0..3] = w0.c0, w0.c1,
 * w1.c0, w1.c1 added to their start values. 8-bit rows: each word holds weights k, k+2, k+1, k+3.
 * The loops run two words a step (fewer loop instructions per multiply-accumulate). */
#define RF_DOT8_2x2_STEP(j)                                                                               \
    do {                                                                                                  \
        const uint32_t wa = read32(w0 + (j)), wb = read32(w1 + (j));                                      \
        const uint32_t x0 = read32(c0 + (j)), x1 = read32(c0 + (j) + 2);                                  \
        const uint32_t y0 = read32(c1 + (j)), y1 = read32(c1 + (j) + 2);                                  \
        const uint32_t a_lo = RF_SXTB16(wa), a_hi = RF_SXTB16_ROR8(wa);                                   \
        const uint32_t b_lo = RF_SXTB16(wb), b_hi = RF_SXTB16_ROR8(wb);                                   \
        a00 = RF_SMLAD(a_lo, x0, a00);                                                                    \
        a00 = RF_SMLAD(a_hi, x1, a00);                                                                    \
        a01 = RF_SMLAD(a_lo, y0, a01);                                                                    \
        a01 = RF_SMLAD(a_hi, y1, a01);                                                                    \
        a10 = RF_SMLAD(b_lo, x0, a10);                                                                    \
        a10 = RF_SMLAD(b_hi, x1, a10);                                                                    \
        a11 = RF_SMLAD(b_lo, y0, a11);                                                                    \
        a11 = RF_SMLAD(b_hi, y1, a11);                                                                    \
    } while (0)

static inline void dot8_2x2(const int8_t *w0, const int8_t *w1, const int16_t *c0, const int16_t *c1, int len,
                            int32_t *acc)
{
    int32_t a00 = acc[0], a01 = acc[1], a10 = acc[2], a11 = acc[3];
    int k;
    for (k = 0; k + 8 <= len; k += 8) {
        RF_DOT8_2x2_STEP(k);
        RF_DOT8_2x2_STEP(k + 4);
    }
    if (k < len) {
        RF_DOT8_2x2_STEP(k);
    }
    acc[0] = a00, acc[1] = a01, acc[2] = a10, acc[3] = a11;
}

/* Four rows, one column (fully connected layers). */
#define RF_DOT8_4x1_STEP(j)                                                                               \
    do {                                                                                                  \
        const uint32_t x0 = read32(c0 + (j)), x1 = read32(c0 + (j) + 2);                                  \
        const uint32_t wa = read32(w0 + (j)), wb = read32(w1 + (j));                                      \
        const uint32_t wc = read32(w2 + (j)), wd = read32(w3 + (j));                                      \
        a0 = RF_SMLAD(RF_SXTB16(wa), x0, a0);                                                             \
        a0 = RF_SMLAD(RF_SXTB16_ROR8(wa), x1, a0);                                                        \
        a1 = RF_SMLAD(RF_SXTB16(wb), x0, a1);                                                             \
        a1 = RF_SMLAD(RF_SXTB16_ROR8(wb), x1, a1);                                                        \
        a2 = RF_SMLAD(RF_SXTB16(wc), x0, a2);                                                             \
        a2 = RF_SMLAD(RF_SXTB16_ROR8(wc), x1, a2);                                                        \
        a3 = RF_SMLAD(RF_SXTB16(wd), x0, a3);                                                             \
        a3 = RF_SMLAD(RF_SXTB16_ROR8(wd), x1, a3);                                                        \
    } while (0)

static inline void dot8_4x1(const int8_t *w0, int row_bytes, const int16_t *c0, int len, int32_t *acc)
{
    const int8_t *w1 = w0 + row_bytes, *w2 = w1 + row_bytes, *w3 = w2 + row_bytes;
    int32_t a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3];
    int k;
    for (k = 0; k < len; k += 4) {
        RF_DOT8_4x1_STEP(k);
    }
    acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;
}

/* Two rows, one column. */
static inline void dot8_2x1(const int8_t *w0, const int8_t *w1, const int16_t *c0, int len, int32_t *acc)
{
    int32_t a0 = acc[0], a1 = acc[1];
    int k;
    for (k = 0; k < len; k += 4) {
        const uint32_t wa = read32(w0 + k), wb = read32(w1 + k);
        const uint32_t x0 = read32(c0 + k), x1 = read32(c0 + k + 2);
        a0 = RF_SMLAD(RF_SXTB16(wa), x0, a0);
        a0 = RF_SMLAD(RF_SXTB16_ROR8(wa), x1, a0);
        a1 = RF_SMLAD(RF_SXTB16(wb), x0, a1);
        a1 = RF_SMLAD(RF_SXTB16_ROR8(wb), x1, a1);
    }
    acc[0] = a0, acc[1] = a1;
}

static inline int32_t dot8_1x1(const int8_t *w, const int16_t *c, int len, int32_t acc)
{
    int k;
    for (k = 0; k < len; k += 4) {
        const uint32_t wa = read32(w + k);
        acc = RF_SMLAD(RF_SXTB16(wa), read32(c + k), acc);
        acc = RF_SMLAD(RF_SXTB16_ROR8(wa), read32(c + k + 2), acc);
    }
    return acc;
}

/* 4-bit rows hold u = w + 8 (0..15), eight to a word; masking a word (shifted by 0, 4, 8, 12 bits)
 * with 0x000F000F gives four pairs (u[k], u[k+1]) .. (u[k+6], u[k+7]) directly as halfwords (the
 * code generator ordered the nibbles so). sum(w * x) = sum(u * x) - 8 * sum(x): the accumulators
 * start at bias - 8 * column sum. `len` counts weights. */
#define RF_NIBBLES 0x000F000Fu

/* A quarter of a 4-bit word: the pair (shift) of both rows times one column word of each column. */
#define RF_DOT4_2x2_QUARTER(shift, j)                                                                     \
    do {                                                                                                  \
        const uint32_t x = read32(c0 + (j)), y = read32(c1 + (j));                                        \
        const uint32_t pa = (wa >> (shift)) & RF_NIBBLES, pb = (wb >> (shift)) & RF_NIBBLES;              \
        a00 = RF_SMLAD(pa, x, a00);                                                                       \
        a01 = RF_SMLAD(pa, y, a01);                                                                       \
        a10 = RF_SMLAD(pb, x, a10);                                                                       \
        a11 = RF_SMLAD(pb, y, a11);                                                                       \
    } while (0)

static inline void dot4_2x2(const int8_t *w0, const int8_t *w1, const int16_t *c0, const int16_t *c1, int len,
                            int32_t *acc)
{
    int32_t a00 = acc[0], a01 = acc[1], a10 = acc[2], a11 = acc[3];
    int k;
    for (k = 0; k < len; k += 8) {
        const uint32_t wa = read32(w0 + k / 2), wb = read32(w1 + k / 2);
        RF_DOT4_2x2_QUARTER(0, k);
        RF_DOT4_2x2_QUARTER(4, k + 2);
        RF_DOT4_2x2_QUARTER(8, k + 4);
        RF_DOT4_2x2_QUARTER(12, k + 6);
    }
    acc[0] = a00, acc[1] = a01, acc[2] = a10, acc[3] = a11;
}

static inline void dot4_2x1(const int8_t *w0, const int8_t *w1, const int16_t *c0, int len, int32_t *acc)
{
    int32_t a0 = acc[0], a1 = acc[1];
    int k;
    for (k = 0; k < len; k += 8) {
        const uint32_t wa = read32(w0 + k / 2), wb = read32(w1 + k / 2);
        int q;
        for (q = 0; q < 4; ++q) {
            const uint32_t x = read32(c0 + k + 2 * q);
            a0 = RF_SMLAD((wa >> (4 * q)) & RF_NIBBLES, x, a0);
            a1 = RF_SMLAD((wb >> (4 * q)) & RF_NIBBLES, x, a1);
        }
    }
    acc[0] = a0, acc[1] = a1;
}

static inline int32_t dot4_1x1(const int8_t *w, const int16_t *c, int len, int32_t acc)
{
    int k, q;
    for (k = 0; k < len; k += 8) {
        const uint32_t wa = read32(w + k / 2);
        for (q = 0; q < 4; ++q) {
            acc = RF_SMLAD((wa >> (4 * q)) & RF_NIBBLES, read32(c + k + 2 * q), acc);
        }
    }
    return acc;
}

/* 8 * the sum of a column: what the 4-bit rows' offset of 8 added to every dot product. */
static int32_t offset_of_column(const int16_t *c, int len)
{
    int32_t total = 0;
    int k;
    for (k = 0; k < len; k += 2) {
        total = RF_SMLAD(read32(c + k), 0x00010001u, total);
    }
    return 8 * total;
}

static inline int8_t requantized(const rf_conv_params *p, int oc, int32_t acc)
{
    return clamp8(rf_requantize(acc, p->multiplier[oc], p->shift[oc]) + p->out_zp, p->act_min, p->act_max);
}

/* Dense convolution (groups 1, any kernel, stride, padding, dilation) and fully connected layers. */
void rf_conv_im2col_s8(const rf_conv_params *p, const int8_t *in, int8_t *out, int16_t *scratch)
{
    const int len = RF_ROW_LEN(p);
    const int row_bytes = p->weight_bits == 4 ? len / 2 : len;
    const int pixels = p->out_h * p->out_w;
    const int four = p->weight_bits == 4;
    int16_t *c0 = scratch, *c1 = scratch + len;
    int px, oc;
    for (px = 0; px + 1 < pixels; px += 2) {
        int32_t off0 = 0, off1 = 0;
        im2col(p, in, px, c0, len);
        im2col(p, in, px + 1, c1, len);
        if (four) {
            off0 = offset_of_column(c0, len);
            off1 = offset_of_column(c1, len);
        }
        for (oc = 0; oc + 1 < p->out_c; oc += 2) {
            const int8_t *w0 = p->weight + (size_t)oc * row_bytes, *w1 = w0 + row_bytes;
            int32_t acc[4];
            acc[0] = p->bias[oc] - off0;
            acc[1] = p->bias[oc] - off1;
            acc[2] = p->bias[oc + 1] - off0;
            acc[3] = p->bias[oc + 1] - off1;
            if (four) {
                dot4_2x2(w0, w1, c0, c1, len, acc);
            } else {
                dot8_2x2(w0, w1, c0, c1, len, acc);
            }
            out[(size_t)oc * pixels + px] = requantized(p, oc, acc[0]);
            out[(size_t)oc * pixels + px + 1] = requantized(p, oc, acc[1]);
            out[(size_t)(oc + 1) * pixels + px] = requantized(p, oc + 1, acc[2]);
            out[(size_t)(oc + 1) * pixels + px + 1] = requantized(p, oc + 1, acc[3]);
        }
        if (oc < p->out_c) { /* an odd channel count: the last channel alone */
            const int8_t *w = p->weight + (size_t)oc * row_bytes;
            out[(size_t)oc * pixels + px] = requantized(
                p, oc, four ? dot4_1x1(w, c0, len, p->bias[oc] - off0) : dot8_1x1(w, c0, len, p->bias[oc]));
            out[(size_t)oc * pixels + px + 1] = requantized(
                p, oc, four ? dot4_1x1(w, c1, len, p->bias[oc] - off1) : dot8_1x1(w, c1, len, p->bias[oc]));
        }
    }
    if (px < pixels) { /* an odd pixel count (a fully connected layer: one pixel) */
        int32_t off0 = 0;
        im2col(p, in, px, c0, len);
        oc = 0;
        if (four) {
            off0 = offset_of_column(c0, len);
        } else {
            for (; oc + 3 < p->out_c; oc += 4) {
                int32_t acc[4];
                int j;
                for (j = 0; j < 4; ++j) {
                    acc[j] = p->bias[oc + j];
                }
                dot8_4x1(p->weight + (size_t)oc * row_bytes, row_bytes, c0, len, acc);
                for (j = 0; j < 4; ++j) {
                    out[(size_t)(oc + j) * pixels + px] = requantized(p, oc + j, acc[j]);
                }
            }
        }
        for (; oc + 1 < p->out_c; oc += 2) {
            const int8_t *w0 = p->weight + (size_t)oc * row_bytes, *w1 = w0 + row_bytes;
            int32_t acc[2];
            acc[0] = p->bias[oc] - off0;
            acc[1] = p->bias[oc + 1] - off0;
            if (four) {
                dot4_2x1(w0, w1, c0, len, acc);
            } else {
                dot8_2x1(w0, w1, c0, len, acc);
            }
            out[(size_t)oc * pixels + px] = requantized(p, oc, acc[0]);
            out[(size_t)(oc + 1) * pixels + px] = requantized(p, oc + 1, acc[1]);
        }
        if (oc < p->out_c) {
            const int8_t *w = p->weight + (size_t)oc * row_bytes;
            out[(size_t)oc * pixels + px] = requantized(
                p, oc, four ? dot4_1x1(w, c0, len, p->bias[oc] - off0) : dot8_1x1(w, c0, len, p->bias[oc]));
        }
    }
}

typedef struct {
    int32_t mult, shift, zp, lo, hi;
} rf_requant_params;

static inline int8_t requant_out(const rf_requant_params *q, int32_t acc)
{
    return clamp8(rf_requantize(acc, q->mult, q->shift) + q->zp, q->lo, q->hi);
}

/* Two int16 halfwords in one word: (low, high). */
static inline uint32_t pair16(int32_t low, int32_t high)
{
    return (uint32_t)(uint16_t)(int16_t)low | ((uint32_t)(uint16_t)(int16_t)high << 16);
}

/* `count` outputs of a 3x3, stride-1 depthwise row whose taps all lie inside the image: rows
 * x0, x1, x2 start at the first output's first tap. Two outputs at a time: a word of each row holds
 * x[i..i+3]; sign-extending bytes 0,2 and 1,3 gives (x[i], x[i+2]) and (x[i+1], x[i+3]), so one
 * dual multiply-accumulate with (w0, w2) and one single one with w1 cover a row of each output. */
static void depthwise3x3_row(const int8_t *x0, const int8_t *x1, const int8_t *x2, const int8_t *w,
                             int32_t bias, const rf_requant_params *q, int8_t *out, int count)
{
    const uint32_t w02_0 = pair16(w[0], w[2]), w02_1 = pair16(w[3], w[5]), w02_2 = pair16(w[6], w[8]);
    const uint32_t w1_0 = pair16(w[1], 0), w1_1 = pair16(w[4], 0), w1_2 = pair16(w[7], 0);
    int i = 0;
    for (; i + 1 < count; i += 2) {
        const uint32_t r0 = read32(x0 + i), r1 = read32(x1 + i), r2 = read32(x2 + i);
        const uint32_t e0 = RF_SXTB16(r0), o0 = RF_SXTB16_ROR8(r0);
        const uint32_t e1 = RF_SXTB16(r1), o1 = RF_SXTB16_ROR8(r1);
        const uint32_t e2 = RF_SXTB16(r2), o2 = RF_SXTB16_ROR8(r2);
        int32_t a = RF_SMLAD(w02_0, e0, bias), b = RF_SMLAD(w02_0, o0, bias);
        a = RF_SMLABB(o0, w1_0, a);
        b = RF_SMLATB(e0, w1_0, b);
        a = RF_SMLAD(w02_1, e1, a);
        b = RF_SMLAD(w02_1, o1, b);
        a = RF_SMLABB(o1, w1_1, a);
        b = RF_SMLATB(e1, w1_1, b);
        a = RF_SMLAD(w02_2, e2, a);
        b = RF_SMLAD(w02_2, o2, b);
        a = RF_SMLABB(o2, w1_2, a);
        b = RF_SMLATB(e2, w1_2, b);
        out[i] = requant_out(q, a);
        out[i + 1] = requant_out(q, b);
    }
    if (i < count) { /* the last one alone: a word would read past its last tap */
        const int32_t acc = bias + x0[i] * w[0] + x0[i + 1] * w[1] + x0[i + 2] * w[2] + x1[i] * w[3] +
                            x1[i + 1] * w[4] + x1[i + 2] * w[5] + x2[i] * w[6] + x2[i + 1] * w[7] +
                            x2[i + 2] * w[8];
        out[i] = requant_out(q, acc);
    }
}

/* `count` outputs of a depthwise row, any kernel: row ky of the taps starts at x + ky * row_step. */
static void depthwise_row(const rf_conv_params *p, const int8_t *x, int row_step, const int8_t *w, int32_t bias,
                          const rf_requant_params *q, int8_t *out, int count)
{
    int ox, ky, kx;
    for (ox = 0; ox < count; ++ox) {
        const int8_t *xs = x + ox * p->stride_w;
        int32_t acc = bias;
        for (ky = 0; ky < p->k_h; ++ky) {
            const int8_t *x_row = xs + ky * row_step;
            const int8_t *w_row = w + ky * p->k_w;
            for (kx = 0; kx < p->k_w; ++kx) {
                acc += x_row[kx * p->dil_w] * w_row[kx];
            }
        }
        out[ox] = requant_out(q, acc);
    }
}

/* `count` outputs of a depthwise row with 5 taps a row (any stride; rows row_step apart): a word at
 * the row's first tap sign-extended gives (x0, x2) and (x1, x3), two dual multiply-accumulates
 * with (w0, w2) and (w1, w3), and x4 alone. `pairs` holds those weight pairs, two per kernel row. */
static void depthwise5_row(const rf_conv_params *p, const int8_t *x, int row_step, const uint32_t *pairs,
                           const int8_t *w, int32_t bias, const rf_requant_params *q, int8_t *out, int count)
{
    int ox, ky;
    for (ox = 0; ox < count; ++ox) {
        const int8_t *xs = x + ox * p->stride_w;
        int32_t acc = bias;
        for (ky = 0; ky < p->k_h; ++ky) {
            const int8_t *row = xs + ky * row_step;
            const uint32_t r = read32(row);
            acc = RF_SMLAD(pairs[2 * ky], RF_SXTB16(r), acc);
            acc = RF_SMLAD(pairs[2 * ky + 1], RF_SXTB16_ROR8(r), acc);
            acc += row[4] * w[ky * 5 + 4];
        }
        out[ox] = requant_out(q, acc);
    }
}

/* A channel's input plane widened by the padding, which holds the zero point (the real value 0):
 * afterwards every output is computed as if inside the image. */
static void padded_plane(const rf_conv_params *p, const int8_t *x_c, int8_t *plane, int width)
{
    const int height = p->pad_top + p->in_h + p->pad_bottom;
    int y;
    memset(plane, p->in_zp, (size_t)p->pad_top * width);
    for (y = 0; y < p->in_h; ++y) {
        int8_t *row = plane + (size_t)(p->pad_top + y) * width;
        memset(row, p->in_zp, (size_t)p->pad_left);
        memcpy(row + p->pad_left, x_c + (size_t)y * p->in_w, (size_t)p->in_w);
        memset(row + p->pad_left + p->in_w, p->in_zp, (size_t)p->pad_right);
    }
    memset(plane + (size_t)(p->pad_top + p->in_h) * width, p->in_zp, (size_t)(height - p->pad_top - p->in_h) * width);
}

/* `count` outputs of a 3x3, stride-2 depthwise row: output i's taps are x[2i..2i+2] of each row;
 * a word at x + 2i sign-extended gives (x[2i], x[2i+2]) and (x[2i+1], .): one dual and one single
 * multiply-accumulate a row. The last output alone: its word would read a byte past its taps. */
static void depthwise3x3_stride2_row(const int8_t *x0, const int8_t *x1, const int8_t *x2, const int8_t *w,
                                     int32_t bias, const rf_requant_params *q, int8_t *out, int count)
{
    const uint32_t w02_0 = pair16(w[0], w[2]), w02_1 = pair16(w[3], w[5]), w02_2 = pair16(w[6], w[8]);
    const uint32_t w1_0 = pair16(w[1], 0), w1_1 = pair16(w[4], 0), w1_2 = pair16(w[7], 0);
    int i;
    for (i = 0; i + 1 < count; ++i) {
        const uint32_t r0 = read32(x0 + 2 * i), r1 = read32(x1 + 2 * i), r2 = read32(x2 + 2 * i);
        int32_t acc = RF_SMLAD(w02_0, RF_SXTB16(r0), bias);
        acc = RF_SMLABB(RF_SXTB16_ROR8(r0), w1_0, acc);
        acc = RF_SMLAD(w02_1, RF_SXTB16(r1), acc);
        acc = RF_SMLABB(RF_SXTB16_ROR8(r1), w1_1, acc);
        acc = RF_SMLAD(w02_2, RF_SXTB16(r2), acc);
        acc = RF_SMLABB(RF_SXTB16_ROR8(r2), w1_2, acc);
        out[i] = requant_out(q, acc);
    }
    if (i < count) {
        const int j = 2 * i;
        const int32_t acc = bias + x0[j] * w[0] + x0[j + 1] * w[1] + x0[j + 2] * w[2] + x1[j] * w[3] +
                            x1[j + 1] * w[4] + x1[j + 2] * w[5] + x2[j] * w[6] + x2[j + 1] * w[7] + x2[j + 2] * w[8];
        out[i] = requant_out(q, acc);
    }
}

/* Fully connected, 8-bit weights in their natural order, in_c a multiple of 4: the zero point folded
 * into the bias, the input read a word at a time and sign-extended in registers (bytes 0,2 and
 * 1,3 of input and weights pair up alike), four output channels at a time. */
void rf_fully_connected_s8(const rf_conv_params *p, const int32_t *bias_folded, const int8_t *in, int8_t *out)
{
    const int len = p->in_c;
    int oc = 0, k, j;
    for (; oc + 3 < p->out_c; oc += 4) {
        const int8_t *w0 = p->weight + (size_t)oc * len, *w1 = w0 + len, *w2 = w1 + len, *w3 = w2 + len;
        int32_t a0 = bias_folded[oc], a1 = bias_folded[oc + 1], a2 = bias_folded[oc + 2], a3 = bias_folded[oc + 3];
        for (k = 0; k < len; k += 4) {
            const uint32_t x = read32(in + k);
            const uint32_t x_even = RF_SXTB16(x), x_odd = RF_SXTB16_ROR8(x);
            const uint32_t wa = read32(w0 + k), wb = read32(w1 + k), wc = read32(w2 + k), wd = read32(w3 + k);
            a0 = RF_SMLAD(RF_SXTB16(wa), x_even, a0);
            a0 = RF_SMLAD(RF_SXTB16_ROR8(wa), x_odd, a0);
            a1 = RF_SMLAD(RF_SXTB16(wb), x_even, a1);
            a1 = RF_SMLAD(RF_SXTB16_ROR8(wb), x_odd, a1);
            a2 = RF_SMLAD(RF_SXTB16(wc), x_even, a2);
            a2 = RF_SMLAD(RF_SXTB16_ROR8(wc), x_odd, a2);
            a3 = RF_SMLAD(RF_SXTB16(wd), x_even, a3);
            a3 = RF_SMLAD(RF_SXTB16_ROR8(wd), x_odd, a3);
        }
        out[oc] = requantized(p, oc, a0);
        out[oc + 1] = requantized(p, oc + 1, a1);
        out[oc + 2] = requantized(p, oc + 2, a2);
        out[oc + 3] = requantized(p, oc + 3, a3);
    }
    for (; oc < p->out_c; ++oc) {
        const int8_t *w = p->weight + (size_t)oc * len;
        int32_t acc = bias_folded[oc];
        for (j = 0; j < len; j += 4) {
            const uint32_t x = read32(in + j), wa = read32(w + j);
            acc = RF_SMLAD(RF_SXTB16(wa), RF_SXTB16(x), acc);
            acc = RF_SMLAD(RF_SXTB16_ROR8(wa), RF_SXTB16_ROR8(x), acc);
        }
        out[oc] = requantized(p, oc, acc);
    }
}

/* Depthwise convolution (groups = in_c = out_c, taps <= RF_MAX_TAPS), one channel and one output
 * row at a time, the zero point folded into the bias: sum((x - zp) * w) = sum(x * w) - zp * sum(w).
 * A padded layer reads a padded copy of one channel's plane (`scratch`, sized by codegen.scratch_bytes);
 * an unpadded one reads its input in place. 3x3 kernels at stride 1 and 2, and rows of 5 taps, have
 * their own dual multiply-accumulate rows. */
void rf_depthwise_s8(const rf_conv_params *p, const int32_t *bias_folded, const int8_t *in, int8_t *out,
                     int8_t *scratch)
{
    const int plane = p->in_h * p->in_w;
    const int taps = p->k_h * p->k_w;
    const int padded = p->pad_top || p->pad_left || p->pad_bottom || p->pad_right;
    const int width = p->pad_left + p->in_w + p->pad_right;
    const int three = p->k_h == 3 && p->k_w == 3 && p->dil_h == 1 && p->dil_w == 1;
    const int five = p->k_w == 5 && p->dil_w == 1 && p->k_h <= RF_MAX_TAPS / 5;
    int8_t w[RF_MAX_TAPS];
    uint32_t pairs[2 * (RF_MAX_TAPS / 5)];
    int c, oy, t;
    for (c = 0; c < p->out_c; ++c) {
        const int8_t *x_c = in + (size_t)c * plane;
        int8_t *out_c = out + (size_t)c * p->out_h * p->out_w;
        rf_requant_params q;
        q.mult = p->multiplier[c], q.shift = p->shift[c], q.zp = p->out_zp, q.lo = p->act_min, q.hi = p->act_max;
        for (t = 0; t < taps; ++t) {
            w[t] = (int8_t)(p->weight_bits == 8 ? p->weight[(size_t)c * taps + t]
                                                : weight4(p->weight, (size_t)c * taps + t));
        }
        for (t = 0; five && t < p->k_h; ++t) {
            pairs[2 * t] = pair16(w[5 * t], w[5 * t + 2]);
            pairs[2 * t + 1] = pair16(w[5 * t + 1], w[5 * t + 3]);
        }
        if (padded) {
            padded_plane(p, x_c, scratch, width);
            x_c = scratch;
        }
        for (oy = 0; oy < p->out_h; ++oy) {
            const int8_t *x = x_c + (size_t)oy * p->stride_h * width;
            const int row_step = p->dil_h * width;
            int8_t *row = out_c + oy * p->out_w;
            if (three && p->stride_w == 1) {
                depthwise3x3_row(x, x + row_step, x + 2 * row_step, w, bias_folded[c], &q, row, p->out_w);
            } else if (three && p->stride_w == 2) {
                depthwise3x3_stride2_row(x, x + row_step, x + 2 * row_step, w, bias_folded[c], &q, row, p->out_w);
            } else if (five) {
                depthwise5_row(p, x, row_step, pairs, w, bias_folded[c], &q, row, p->out_w);
            } else {
                depthwise_row(p, x, row_step, w, bias_folded[c], &q, row, p->out_w);
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

/* MaxPool and AveragePool over windows (rankfold/cexport/ir.py, Pool): the taps inside the input;
 * for the average, count_include_pad also counts the taps in the padding (as the real value 0), and
 * the sum is requantized by the pair for its count, mults[2 * count], mults[2 * count + 1]. */
void rf_pool_s8(const rf_pool_params *p, const int32_t *mults, const int8_t *in, int8_t *out)
{
    const int plane = p->in_h * p->in_w;
    const int padded_h = p->in_h + p->pad_top + p->pad_bottom, padded_w = p->in_w + p->pad_left + p->pad_right;
    int c, oy, ox, ky, kx;
    for (c = 0; c < p->channels; ++c) {
        const int8_t *x_c = in + (size_t)c * plane;
        for (oy = 0; oy < p->out_h; ++oy) {
            const int iy0 = oy * p->stride_h - p->pad_top;
            int ky_first, ky_end;
            tap_range(iy0, p->dil_h, p->k_h, p->in_h, &ky_first, &ky_end);
            for (ox = 0; ox < p->out_w; ++ox) {
                const int ix0 = ox * p->stride_w - p->pad_left;
                int kx_first, kx_end;
                int32_t value;
                tap_range(ix0, p->dil_w, p->k_w, p->in_w, &kx_first, &kx_end);
                if (p->is_max) {
                    int32_t best = INT32_MIN;
                    for (ky = ky_first; ky < ky_end; ++ky) {
                        const int8_t *row = x_c + (size_t)(iy0 + ky * p->dil_h) * p->in_w + ix0;
                        for (kx = kx_first; kx < kx_end; ++kx) {
                            best = row[kx * p->dil_w] > best ? row[kx * p->dil_w] : best;
                        }
                    }
                    value = rf_requantize(best - p->in_zp, mults[0], mults[1]);
                } else {
                    int32_t total = 0, count;
                    for (ky = ky_first; ky < ky_end; ++ky) {
                        const int8_t *row = x_c + (size_t)(iy0 + ky) * p->in_w + ix0;
                        for (kx = kx_first; kx < kx_end; ++kx) {
                            total += row[kx] - p->in_zp;
                        }
                    }
                    count = (ky_end - ky_first) * (kx_end - kx_first);
                    if (p->count_include_pad) { /* the taps inside the padded input */
                        int y_first, y_end, x_first, x_end;
                        tap_range(iy0 + p->pad_top, 1, p->k_h, padded_h, &y_first, &y_end);
                        tap_range(ix0 + p->pad_left, 1, p->k_w, padded_w, &x_first, &x_end);
                        count = (y_end - y_first) * (x_end - x_first);
                    }
                    value = rf_requantize(total, mults[2 * count], mults[2 * count + 1]);
                }
                out[((size_t)c * p->out_h + oy) * p->out_w + ox] = clamp8(value + p->out_zp, -128, 127);
            }
        }
    }
}

/* Requantizing copy of `outer` blocks of `in_block` values into blocks `out_block` apart (Concat:
 * one call per input, `out` at that input's place in the first block). */
void rf_copy_blocks_s8(const int8_t *in, int32_t in_zp, int8_t *out, int32_t out_zp, int32_t mult, int32_t shift,
                       int32_t outer, int32_t in_block, int32_t out_block)
{
    int32_t o, i;
    for (o = 0; o < outer; ++o) {
        const int8_t *src = in + (size_t)o * in_block;
        int8_t *dst = out + (size_t)o * out_block;
        for (i = 0; i < in_block; ++i) {
            dst[i] = clamp8(rf_requantize((int32_t)src[i] - in_zp, mult, shift) + out_zp, -128, 127);
        }
    }
}

/* a * b, b[(i / inner) % count] with a[i]: (a - za) * (b - zb) requantized by s_a * s_b / s_out. */
void rf_mul_s8(const int8_t *a, int32_t a_zp, const int8_t *b, int32_t b_zp, int8_t *out, int32_t out_zp,
               int32_t mult, int32_t shift, int32_t act_min, int32_t size, int32_t count, int32_t inner)
{
    int32_t base, c, i;
    for (base = 0; base < size; base += count * inner) {
        for (c = 0; c < count; ++c) {
            const int32_t bv = (int32_t)b[c] - b_zp;
            const size_t start = (size_t)base + (size_t)c * inner;
            for (i = 0; i < inner; ++i) {
                const int32_t product = ((int32_t)a[start + i] - a_zp) * bv;
                out[start + i] = clamp8(rf_requantize(product, mult, shift) + out_zp, act_min, 127);
            }
        }
    }
}

/* An element-wise function by table: row r of `table` (256 outputs, indexed by input + 128) for the
 * r-th block of `inner` values (one row for all, or one per channel). */
void rf_lookup_s8(const int8_t *in, int8_t *out, const int8_t *table, int32_t rows, int32_t inner)
{
    int32_t r, i;
    for (r = 0; r < rows; ++r) {
        const int8_t *t = table + (size_t)r * 256 + 128;
        const int8_t *src = in + (size_t)r * inner;
        int8_t *dst = out + (size_t)r * inner;
        for (i = 0; i < inner; ++i) {
            dst[i] = t[src[i]];
        }
    }
}

/* Constant padding of up to four per-sample dimensions (leading ones filled with 1). */
void rf_pad_s8(const int8_t *in, int32_t in_zp, int8_t *out, int32_t out_zp, int32_t mult, int32_t shift,
               int32_t value, const int32_t *in_dims, const int32_t *out_dims, const int32_t *before)
{
    const size_t out_size = (size_t)out_dims[0] * out_dims[1] * out_dims[2] * out_dims[3];
    int32_t i0, i1, i2, i3;
    memset(out, value, out_size);
    for (i0 = 0; i0 < in_dims[0]; ++i0) {
        for (i1 = 0; i1 < in_dims[1]; ++i1) {
            for (i2 = 0; i2 < in_dims[2]; ++i2) {
                const int8_t *src = in + (((size_t)i0 * in_dims[1] + i1) * in_dims[2] + i2) * in_dims[3];
                int8_t *dst = out + ((((size_t)(i0 + before[0]) * out_dims[1] + i1 + before[1]) * out_dims[2] + i2 +
                                      before[2]) * out_dims[3] + before[3]);
                for (i3 = 0; i3 < in_dims[3]; ++i3) {
                    dst[i3] = clamp8(rf_requantize((int32_t)src[i3] - in_zp, mult, shift) + out_zp, -128, 127);
                }
            }
        }
    }
}

/* A permutation of up to four per-sample dimensions: output index (o0..o3) reads the input at
 * sum(o_k * in_strides[k]). */
void rf_transpose_s8(const int8_t *in, int32_t in_zp, int8_t *out, int32_t out_zp, int32_t mult, int32_t shift,
                     const int32_t *out_dims, const int32_t *in_strides)
{
    int32_t o0, o1, o2, o3;
    for (o0 = 0; o0 < out_dims[0]; ++o0) {
        for (o1 = 0; o1 < out_dims[1]; ++o1) {
            for (o2 = 0; o2 < out_dims[2]; ++o2) {
                const int8_t *src = in + (size_t)o0 * in_strides[0] + (size_t)o1 * in_strides[1] +
                                    (size_t)o2 * in_strides[2];
                for (o3 = 0; o3 < out_dims[3]; ++o3) {
                    *out++ = clamp8(rf_requantize((int32_t)src[(size_t)o3 * in_strides[3]] - in_zp, mult, shift) +
                                    out_zp, -128, 127);
                }
            }
        }
    }
}

/* Softmax along rows of `length` values, in integers (ir.py, Softmax): e = exp_table[max - x],
 * out = (e * inv + S / 2) / S + zp with S = sum(e) << RF_SOFTMAX_SCALE_BITS. */
void rf_softmax_s8(const int8_t *in, int8_t *out, int32_t rows, int32_t length, const int32_t *exp_table,
                   int32_t inv, int32_t out_zp)
{
    int32_t r, i;
    for (r = 0; r < rows; ++r) {
        const int8_t *x = in + (size_t)r * length;
        int8_t *y = out + (size_t)r * length;
        int32_t top = -128;
        int64_t total = 0;
        for (i = 0; i < length; ++i) {
            top = x[i] > top ? x[i] : top;
        }
        for (i = 0; i < length; ++i) {
            total += exp_table[top - x[i]];
        }
        total <<= RF_SOFTMAX_SCALE_BITS;
        for (i = 0; i < length; ++i) {
            const int64_t q = ((int64_t)exp_table[top - x[i]] * inv + total / 2) / total;
            y[i] = clamp8((int32_t)(q > 255 ? 255 : q) + out_zp, -128, 127);
        }
    }
}
