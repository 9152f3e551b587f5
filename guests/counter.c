/* Counts for ever, in memory and on the serial line: the guest the snapshot
 * tests and benchmarks run mid-flight.
 *
 * Each step adds `step` to the count and stores the count in one of `pages`
 * 4 KiB pages (round robin), so the set of pages it dirties between two
 * snapshots is known. Every `every` steps it prints "n=<count> sum=<sum>"
 * where sum adds up what the pages hold (so a restored copy shows that its
 * memory came back). A byte on the serial line sets the step ('1'..'9');
 * 'q' ends the guest with the count (mod 256) as the exit code.
 *
 * args: pages=N (1..4096, default 16), every=N (default 1000000)
 */
#include "runtime/hvkit.h"

#define MAX_PAGES 4096
#define COM1 0x3F8

static u64 area[MAX_PAGES][512] __attribute__((aligned(4096)));

int main(int cpu, int ncpus, const char *args)
{
    (void)ncpus;
    if (cpu != 0)
        return 0;
    int pages = rt_arg_int(args, "pages", 16);
    int every = rt_arg_int(args, "every", 1000000);
    if (pages < 1 || pages > MAX_PAGES)
        pages = 16;
    if (every < 1)
        every = 1000000;
    u64 count = 0, step = 1;
    int page = 0, tick = 0;
    rt_puts("counter ready\n");
    for (;;) {
        count += step;
        area[page][0] = count;
        if (++page == pages)
            page = 0;
        if (++tick < every)
            continue;
        tick = 0;
        u64 sum = 0;
        for (int i = 0; i < pages; i++)
            sum += area[i][0];
        rt_printf("n=%lu sum=%lu\n", (unsigned long)count, (unsigned long)sum);
        if (inb(COM1 + 5) & 1) {
            u8 c = inb(COM1);
            if (c == 'q')
                rt_exit((int)(count & 0xFF));
            if (c >= '1' && c <= '9')
                step = (u64)(c - '0');
        }
    }
}
