/* rankfold int8 kernels: plain C99. */
#ifndef RANKFOLD_KERNELS_H
#define RANKFOLD_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#define RF_ADD_LEFT_SHIFT 20
#define RF_MAX_TAPS 64 /* kernel taps (k_h * k_w) the dense kernel handles */

typedef struct {
    int32_t in_c, in_h, in_w, in_zp;
    int32_t out_c, out_h, out_w, out_zp;
    int32_t k_h, k_w, stride_h, stride_w, pad_top, pad_left, pad_bottom, pad_right, dil_h, dil_w, groups;
    int32_t act_min, act_max;
    int32_t weight_bits;      /* 8, or 4: two weights per byte, the first in the low nibble */
    const int8_t *weight;     /* (out_c, in_c / groups, k_h, k_w) */
    const int32_t *bias;      /* (out_c) at scale s_in * s_w[c] */
    const int32_t *multiplier; /* (out_c) */
    const int32_t *shift;     /* (out_c) */
} rf_conv_params;

int32_t rf_requantize(int32_t x, int32_t multiplier, int32_t shift);
void rf_conv_s8(const rf_conv_params *p, const int8_t *in, int8_t *out);
void rf_conv_dense_s8(const rf_conv_params *p, const int32_t *bias_folded, const int8_t *in, int8_t *out,
                      int8_t *scratch);
void rf_add_s8(const int8_t *a, int32_t a_zp, int32_t a_mult, int32_t a_shift,
               const int8_t *b, int32_t b_zp, int32_t b_mult, int32_t b_shift,
               int8_t *out, int32_t out_zp, int32_t out_mult, int32_t out_shift,
               int32_t act_min, int32_t size);
void rf_avgpool_s8(const int8_t *in, int32_t in_zp, int32_t channels, int32_t count,
                   int8_t *out, int32_t out_zp, int32_t mult, int32_t shift);
void rf_requant_s8(const int8_t *in, int32_t in_zp, int8_t *out, int32_t out_zp, int32_t mult, int32_t shift,
                   int32_t act_min, int32_t size);

#endif
