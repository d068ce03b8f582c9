/* rankfold test driver: reads int8 input samples from a file, runs the model on each, writes the
 * int8 outputs to another file. Usage: model_test INPUTS.bin OUTPUTS.bin
 * Built with -DRF_CORTEX_M (make cortex-m) it runs under qemu with semihosting and also prints,
 * per sample, the instructions model_run took (SysTick under -icount shift=0, calibrated against
 * a loop of known length). */
#include <stdio.h>

#include "model.h"

static uint32_t arena[(MODEL_ARENA_SIZE + 7) / 4]; /* word-aligned, as model_run requires */
static int8_t input[MODEL_INPUT_SIZE];
static int8_t output[MODEL_OUTPUT_SIZE];

#ifdef RF_CORTEX_M
#define SYST_CSR (*(volatile uint32_t *)0xE000E010u)
#define SYST_RVR (*(volatile uint32_t *)0xE000E014u)
#define SYST_CVR (*(volatile uint32_t *)0xE000E018u)
extern volatile uint32_t rf_systick_wraps;

static uint64_t ticks(void)
{
    uint32_t before, value, after;
    do {
        before = rf_systick_wraps;
        value = SYST_CVR;
        after = rf_systick_wraps;
    } while (before != after);
    return (uint64_t)before * 0x1000000u + (0xFFFFFFu - value);
}

/* Stack high-water mark: the region below the stack pointer is painted before the runs and
 * scanned after them. */
#define RF_STACK_PAINT (64u * 1024u)
#define RF_PAINT 0xA5A5A5A5u

static uint32_t stack_pointer(void)
{
    uint32_t sp;
    __asm volatile("mov %0, sp" : "=r"(sp));
    return sp;
}

static void paint_stack(uint32_t top)
{
    volatile uint32_t *p = (volatile uint32_t *)(top - RF_STACK_PAINT);
    while ((uint32_t)p < top - 256u) {
        *p++ = RF_PAINT;
    }
}

static uint32_t stack_used(uint32_t top)
{
    const volatile uint32_t *p = (const volatile uint32_t *)(top - RF_STACK_PAINT);
    while ((uint32_t)p < top && *p == RF_PAINT) {
        ++p;
    }
    return top - (uint32_t)p;
}

#ifdef RF_PROFILE
/* Ticks from the start of model_run (or the previous op) to the end of each op. */
static uint64_t rf_op_ticks[MODEL_OPS];
static uint64_t rf_op_start;

void rf_profile_mark(int op)
{
    const uint64_t now = ticks();
    rf_op_ticks[op] += now - rf_op_start;
    rf_op_start = ticks();
}
#endif

/* Ticks taken by 2 * loops instructions (subs + bne per iteration). */
static uint64_t calibration_ticks(uint32_t loops)
{
    uint64_t start = ticks();
    __asm volatile("1: subs %0, %0, #1\n bne 1b" : "+r"(loops));
    return ticks() - start;
}
#endif

int main(int argc, char **argv)
{
    FILE *in_file, *out_file;
    long count = 0;
    const char *in_path = argc > 1 ? argv[1] : "inputs.bin";
    const char *out_path = argc > 2 ? argv[2] : "outputs.bin";
#ifdef RF_CORTEX_M
    uint64_t per_tick_x1000;
    const uint32_t stack_top = stack_pointer();
    uint32_t stack_max = 0;
    SYST_RVR = 0xFFFFFFu;
    SYST_CVR = 0;
    SYST_CSR = 7u; /* processor clock, interrupt on wrap, enabled */
    while (SYST_CVR == 0) {
    }
    per_tick_x1000 = (2000000ull * 1000ull) / calibration_ticks(1000000u);
    printf("instructions_per_tick_x1000 %lu\n", (unsigned long)per_tick_x1000);
#endif
    in_file = fopen(in_path, "rb");
    out_file = fopen(out_path, "wb");
    if (in_file == NULL || out_file == NULL) {
        fprintf(stderr, "cannot open %s or %s\n", in_path, out_path);
        return 2;
    }
    while (fread(input, 1, MODEL_INPUT_SIZE, in_file) == MODEL_INPUT_SIZE) {
#ifdef RF_CORTEX_M
        uint64_t start, end;
        uint32_t used;
        paint_stack(stack_top);
        start = ticks();
#ifdef RF_PROFILE
        rf_op_start = start;
#endif
        model_run(input, output, (uint8_t *)arena);
        end = ticks();
        used = stack_used(stack_top);
        stack_max = used > stack_max ? used : stack_max;
        printf("sample %ld ticks %lu\n", count, (unsigned long)(end - start));
#else
        model_run(input, output, (uint8_t *)arena);
#endif
        if (fwrite(output, 1, MODEL_OUTPUT_SIZE, out_file) != MODEL_OUTPUT_SIZE) {
            fprintf(stderr, "write failed\n");
            return 1;
        }
        ++count;
    }
    fclose(in_file);
    fclose(out_file);
#ifdef RF_CORTEX_M
    printf("stack_bytes %lu\n", (unsigned long)stack_max); /* below main's frame, during model_run */
#ifdef RF_PROFILE
    {
        int op;
        for (op = 0; op < MODEL_OPS; ++op) {
            printf("op %d ticks %lu\n", op, (unsigned long)rf_op_ticks[op]);
        }
    }
#endif
#endif
    printf("%ld samples\n", count);
    return 0;
}
