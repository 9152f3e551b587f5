/* Port-I/O exit benchmark: N one-byte `out`s to a benchmark port, timed
 * with the TSC, then the exit port. benchmarks/exits.py runs this same code
 * under a bare C KVM loop and under hvkit, so only the VMM side differs.
 *
 * Two entries reach the same loop:
 *   _start (the runtime)  -> main() at CPL3, where this host's KVM runs
 *                            guest code natively and an exit costs ~56 us;
 *   exitloop_cpl0         -> the loop at CPL0, where an exit costs ~7.7 us
 *                            but every instruction is emulated.
 * Both read "n=<iterations> port=<port>" and exit with the loop's TSC
 * cycles >> 10 (so the host gets a guest-side timing with no VMM set-up in it). */
#include "runtime/hvkit.h"

#define TSC_SHIFT 10

/* Three instructions an iteration: out, dec, jnz. */
static u32 exit_loop(u16 port, u32 n)
{
    u64 t0 = rdtsc();
    if (n)
        __asm__ volatile("1: outb %%al, %%dx\n\t"
                         "dec %%ecx\n\t"
                         "jnz 1b"
                         : "+c"(n) : "a"(0), "d"(port) : "memory");
    u64 cycles = (rdtsc() - t0) >> TSC_SHIFT;
    return cycles > 0x7FFFFFFF ? 0x7FFFFFFF : (u32)cycles;
}

static u32 bench(const char *args)
{
    u32 n = (u32)rt_arg_int(args, "n", 10000);
    u16 port = (u16)rt_arg_int(args, "port", 0xE0);
    return exit_loop(port, n);
}

/* CPL0 entry, set by the host in place of _start: rdx = argument string,
 * rsp = a boot stack. No runtime set-up: the loop runs on the VMM's tables. */
void exitloop_cpl0_main(const char *args) __attribute__((used, noreturn));
void exitloop_cpl0_main(const char *args)
{
    outl(EXIT_PORT, bench(args));
    for (;;)
        __asm__ volatile("hlt");
}

__asm__(".text\n"
        ".global exitloop_cpl0\n"
        "exitloop_cpl0:\n"
        "    cli\n"
        "    mov %rdx, %rdi\n"
        "    and $-16, %rsp\n"
        "    call exitloop_cpl0_main\n");

int main(int cpu, int ncpus, const char *args)
{
    (void)ncpus;
    if (cpu != 0)
        return 0;
    return (int)bench(args);
}
