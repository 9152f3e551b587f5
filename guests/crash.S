/* Triple-faults on purpose: with an empty IDT, #UD escalates to #GP, #DF
 * and a shutdown. No runtime: this must work on a bare vCPU. */
    .section .text.start, "ax"
    .code64
    .global _start
_start:
    lidt empty_idt(%rip)
    ud2
empty_idt:
    .word 0
    .quad 0
