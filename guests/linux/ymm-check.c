/*
 * ymm-check: does the guest kernel preserve AVX (YMM) registers across a
 * context switch? Run two at once inside the guest:
 *     ymm-check 300 A & ymm-check 300 B & wait
 * Each puts a pattern in ymm0/ymm1, calls sched_yield (so the other one runs
 * and loads its own pattern), and counts rounds whose registers came back
 * changed. It also prints what user space sees: CPUID OSXSAVE/AVX and XCR0.
 * On the nested PVM-based KVM, with a noxsave kernel: xcr0=0xe7 and about
 * two thirds of the rounds bad. Build: gcc -O2 -static -mavx2 -o ymm-check ymm-check.c
 */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <cpuid.h>
int main(int argc, char **argv) {
    unsigned a, b, c, d; __cpuid(1, a, b, c, d);
    int osx = (c >> 27) & 1, avx = (c >> 28) & 1;
    unsigned long xcr0 = 0;
    if (osx) { unsigned lo, hi; __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0)); xcr0 = ((unsigned long)hi << 32) | lo; }
    int rounds = atoi(argv[1]), bad = 0, ran = 0;
    if (osx && avx && (xcr0 & 6) == 6) {
        ran = 1;
        for (int r = 0; r < rounds; r++) {
            unsigned long v = (unsigned long)getpid() * 0x9e3779b97f4a7c15UL + r;
            unsigned long out[8];
            __asm__ volatile(
                "vmovq %[v], %%xmm0\n\t vpbroadcastq %%xmm0, %%ymm0\n\t vmovdqa %%ymm0, %%ymm1\n\t"
                "mov $24, %%eax\n\t syscall\n\t"      /* sched_yield */
                "vmovdqu %%ymm0, 0(%[o])\n\t vmovdqu %%ymm1, 32(%[o])\n\t vzeroupper\n\t"
                : : [v] "r" (v), [o] "r" (out) : "rax", "rcx", "r11", "memory", "xmm0", "xmm1");
            for (int i = 0; i < 8; i++) if (out[i] != v) { bad++; break; }
        }
    }
    printf("%s osxsave=%d avx=%d xcr0=%#lx ymm-ran=%d ymm-bad=%d of %d\n", argv[2], osx, avx, xcr0, ran, bad, rounds);
    return 0;
}
