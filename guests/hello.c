/* Prints a greeting over COM1 and exits with the code given as "exit=N".
 * With "hypercall=N" it first makes hypercall N with arguments 1..6 and
 * prints what the host returned. */
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
    return rt_arg_int(args, "exit", 0);
}
