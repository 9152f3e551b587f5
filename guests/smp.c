/* Every vCPU reports its index and APIC ID; vCPU 0 waits for all of them
 * and exits with the number that reported. */
#include "runtime/hvkit.h"

static volatile int reported;

int main(int cpu, int ncpus, const char *args)
{
    (void)args;
    rt_printf("cpu %d apic %u lapic %u\n", cpu, rt_apic_id(), rt_lapic_id());
    __atomic_fetch_add(&reported, 1, __ATOMIC_SEQ_CST);
    if (cpu != 0)
        return 0;
    while (__atomic_load_n(&reported, __ATOMIC_SEQ_CST) < ncpus)
        cpu_relax();
    rt_printf("all %d cpus reported\n", ncpus);
    return reported;
}
