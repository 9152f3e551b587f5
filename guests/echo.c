/* Writes back every byte it reads from the serial port; ^D (0x04) ends it
 * with the count of bytes echoed (mod 256) as the exit code. */
#include "runtime/hvkit.h"

int main(int cpu, int ncpus, const char *args)
{
    (void)ncpus;
    (void)args;
    if (cpu != 0)
        return 0;
    rt_puts("echo ready\n");
    unsigned count = 0;
    for (;;) {
        int c = rt_getc();
        if (c == 4)
            break;
        char ch = (char)c;
        rt_write(&ch, 1);
        count++;
    }
    return (int)(count & 0xFF);
}
