/* Touches an unmapped address from user mode: the runtime's page-fault
 * handler reports it and the host raises GuestCrash with the details. */
#include "runtime/hvkit.h"

int main(int cpu, int ncpus, const char *args)
{
    (void)ncpus;
    (void)args;
    if (cpu != 0)
        return 0;
    rt_puts("about to fault\n");
    return *(volatile int *)0x100000000000ul;
}
