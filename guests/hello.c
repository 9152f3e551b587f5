/* Prints a greeting over COM1 and exits with the code given as "exit=N".
 * With "hypercall=N" it first makes hypercall N with arguments 1..6 and
 * prints what the host returned; with "kcall=1" it reads CR3 through a
 * kernel call (CPL3 to CPL0 and back). */
#include "runtime/hvkit.h"

int main(int cpu, int ncpus, const char *args)
{
    (void)ncpus;
    if (cpu != 0)
        return 0;
    rt_puts("Hello from an hvkit guest!\n");
    int nr = rt_arg_int(args, "hypercall", 0);
    if (nr)
        rt_printf("hypercall %d returned %ld\n", nr, rt_hypercall((u64)nr, 1, 2, 3, 4, 5, 6));
    if (rt_arg_int(args, "kcall", 0))
        rt_printf("cr3 %lx pml4 %lx\n", rt_kcall(KCALL_READ_CR3, 0, 0), (u64)rt_pml4);
    return rt_arg_int(args, "exit", 0);
}
