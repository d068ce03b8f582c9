/* rankfold int8 kernels: C99, no allocation, no floating point. On cores with the DSP extension
 * (Cortex-M4, M7, M33, M55; __ARM_FEATURE_DSP) the inner loops use its dual 16-bit multiply-
 * accumulate through ACLE intrinsics; elsewhere (Cortex-M0+/M3, the host build) the same loops run
 * on portable C that computes the same integers. */
#ifndef RANKFOLD_KERNELS_H
#define RANKFOLD_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#define RF_ADD_LEFT_SHIFT 20
#define RF_MAX_TAPS 64 /* kernel taps (k_h * k_w) the depthwise kernel handles */

typedef struct {
    int32_t in_c, in_h, in_w, in_zp;
    int32_t out_c, out_h, out_w, out_zp;
    int32_t k_h, k_w, stride_h, stride_w, pad_top, pad_left, pad_bottom, pad_right, dil_h, dil_w, groups;
    int32_t act_min, act_max;
    int32_t weight_bits;      /* 8, or 4: two weights per byte, the first in the low nibble */
    const int8_t *weight;     /* rf_conv_s8 and rf_depthwise_s8: (out_c, in_c / groups, k_h, k_w);
                               * rf_conv_im2col_s8: each output channel's row padded to RF_ROW_LEN
                               * and interleaved for the dual multiply-accumulate (codegen.py) */
    const int32_t *bias;      /* (out_c) at scale s_in * s_w[c] */
    const int32_t *multiplier; /* (out_c) */
    const int8_t *shift;      /* (out_c): a power of two, -31 to 30 in practice; a byte (CMSIS-NN keeps an int32) */
} rf_conv_params;

/* The length of one output channel's weight row and of one im2col column: the taps of all input
 * channels, rounded up to whole 32-bit words of weights (4 int8 or 8 int4 weights). */
#define RF_ROW_LEN(p) ((((p)->in_c * (p)->k_h * (p)->k_w) + ((p)->weight_bits == 4 ? 7 : 3)) & \
                       ~((p)->weight_bits == 4 ? 7 : 3))
/* round(x * multiplier * 2^(shift - 31)) as TFLite / CMSIS-NN compute it (rankfold/cexport/arith.py):
 * x scaled up by the left shift with saturation, the doubling high multiply rounded half away from
 * zero (for the non-negative multipliers used here that is (x * m + 2^30) >> 31, an arithmetic
 * shift), then a rounding right shift, halves away from zero. It runs once per output value, so it
 * is inline and almost branch-free: a right shift of 0 rounds nothing, and only a left shift that
 * would overflow (a huge accumulator) leaves the inline path. */
typedef struct {
    int32_t channels, in_h, in_w, in_zp, out_h, out_w, out_zp;
    int32_t k_h, k_w, stride_h, stride_w, pad_top, pad_left, pad_bottom, pad_right, dil_h, dil_w;
    int32_t is_max, count_include_pad;
} rf_pool_params;

#define RF_SOFTMAX_SCALE_BITS 8

int32_t rf_requantize_saturated(int32_t x, int32_t multiplier, int32_t left);

static inline int32_t rf_requantize(int32_t x, int32_t multiplier, int32_t shift)
{
    const int32_t left = shift > 0 ? shift : 0, right = shift > 0 ? 0 : -shift;
    const int32_t scaled = (int32_t)((uint32_t)x << left);
    int32_t high, mask, threshold;
    if ((scaled >> left) != x) {
        return rf_requantize_saturated(x, multiplier, left);
    }
    high = (int32_t)(((int64_t)scaled * multiplier + ((int64_t)1 << 30)) >> 31);
    mask = (int32_t)(((uint32_t)1 << right) - 1u);
    threshold = (mask >> 1) + (high < 0 ? 1 : 0);
    return (high >> right) + ((high & mask) > threshold ? 1 : 0);
}

void rf_conv_s8(const rf_conv_params *p, const int8_t *in, int8_t *out);
void rf_conv_im2col_s8(const rf_conv_params *p, const int8_t *in, int8_t *out, int16_t *scratch);
void rf_fully_connected_s8(const rf_conv_params *p, const int32_t *bias_folded, const int8_t *in, int8_t *out);
void rf_depthwise_s8(const rf_conv_params *p, const int32_t *bias_folded, const int8_t *in, int8_t *out,
                     int8_t *scratch);
void rf_add_s8(const int8_t *a, int32_t a_zp, int32_t a_mult, int32_t a_shift,
               const int8_t *b, int32_t b_zp, int32_t b_mult, int32_t b_shift,
               int8_t *out, int32_t out_zp, int32_t out_mult, int32_t out_shift,
               int32_t act_min, int32_t size);
void rf_avgpool_s8(const int8_t *in, int32_t in_zp, int32_t channels, int32_t count,
                   int8_t *out, int32_t out_zp, int32_t mult, int32_t shift);
void rf_requant_s8(const int8_t *in, int32_t in_zp, int8_t *out, int32_t out_zp, int32_t mult, int32_t shift,
                   int32_t act_min, int32_t size);
void rf_pool_s8(const rf_pool_params *p, const int32_t *mults, const int8_t *in, int8_t *out);
void rf_copy_blocks_s8(const int8_t *in, int32_t in_zp, int8_t *out, int32_t out_zp, int32_t mult, int32_t shift,
                       int32_t outer, int32_t in_block, int32_t out_block);
void rf_mul_s8(const int8_t *a, int32_t a_zp, const int8_t *b, int32_t b_zp, int8_t *out, int32_t out_zp,
               int32_t mult, int32_t shift, int32_t act_min, int32_t size, int32_t count, int32_t inner);
void rf_lookup_s8(const int8_t *in, int8_t *out, const int8_t *table, int32_t rows, int32_t inner);
void rf_pad_s8(const int8_t *in, int32_t in_zp, int8_t *out, int32_t out_zp, int32_t mult, int32_t shift,
               int32_t value, const int32_t *in_dims, const int32_t *out_dims, const int32_t *before);
void rf_transpose_s8(const int8_t *in, int32_t in_zp, int8_t *out, int32_t out_zp, int32_t mult, int32_t shift,
                     const int32_t *out_dims, const int32_t *in_strides);
void rf_softmax_s8(const int8_t *in, int8_t *out, int32_t rows, int32_t length, const int32_t *exp_table,
                   int32_t inv, int32_t out_zp);

#endif
