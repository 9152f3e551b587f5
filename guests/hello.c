/* Prints a greeting over COM1 and exits with the code given as "exit=N". */
#include "runtime/hvkit.h"

int main(int cpu, int ncpus, const char *args)
{
    (void)ncpus;
    if (cpu != 0)
        return 0;
    rt_puts("Hello from an hvkit guest!\n");
    return rt_arg_int(args, "exit", 0);
}
