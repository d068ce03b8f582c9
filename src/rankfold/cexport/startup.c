/* rankfold: minimal Cortex-M start-up for the emulated test boards (qemu mps2-*): vector table,
 * reset into newlib's semihosting crt0 (rdimon), and a SysTick counter for instruction counts. */
#include <stdint.h>

extern uint32_t __stack_top;
extern void _start(void);

volatile uint32_t rf_systick_wraps;

void Reset_Handler(void);
void Default_Handler(void);
void SysTick_Handler(void);
void _init(void);
void _fini(void);

void Reset_Handler(void)
{
    _start();
    for (;;) {
    }
}

void Default_Handler(void)
{
    for (;;) {
    }
}

void SysTick_Handler(void)
{
    ++rf_systick_wraps;
}

void _init(void) {}
void _fini(void) {}

__attribute__((section(".vectors"), used)) static const void *const vectors[16] = {
    &__stack_top, (const void *)Reset_Handler, (const void *)Default_Handler, (const void *)Default_Handler,
    (const void *)Default_Handler, (const void *)Default_Handler, (const void *)Default_Handler, 0, 0, 0, 0,
    (const void *)Default_Handler, (const void *)Default_Handler, 0, (const void *)Default_Handler,
    (const void *)SysTick_Handler};
