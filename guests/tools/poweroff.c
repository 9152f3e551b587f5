/* hvkit-poweroff N: end the VM with exit code N through hvkit's exit port.
 *
 * A Linux guest without ACPI can only halt or reset; this gives its init a
 * way to hand the VM's caller a status. Static, no libc: it runs in any
 * initramfs. Needs CAP_SYS_RAWIO (init runs as root). */
#include "syscall.h"

#define SYS_ioperm 173
#define SYS_sync 162
#define SYS_nanosleep 35
#define EXIT_PORT 0x500

__attribute__((used)) void start_c(long *sp)
{
    long argc = sp[0];
    char **argv = (char **)(sp + 1);
    unsigned code = 0;
    if (argc > 1) {
        for (const char *p = argv[1]; *p; p++) {
            if (*p < '0' || *p > '9') {
                say("usage: hvkit-poweroff [EXIT_CODE]\n");
                sys3(SYS_exit, 2, 0, 0);
            }
            code = code * 10 + (unsigned)(*p - '0');
        }
    }
    sys3(SYS_sync, 0, 0, 0);
    if (sys3(SYS_ioperm, EXIT_PORT, 4, 1) != 0) {
        say("hvkit-poweroff: ioperm failed (not root, or not an hvkit VM)\n");
        sys3(SYS_exit, 1, 0, 0);
    }
    __asm__ volatile("outl %0, %1" :: "a"(code), "Nd"((unsigned short)EXIT_PORT));
    /* Still here a second later: no hvkit exit port (another VMM), so let
     * the caller fall back to reboot. */
    long ts[2] = { 1, 0 };
    sys3(SYS_nanosleep, (long)ts, 0, 0);
    say("hvkit-poweroff: no hvkit exit port answered\n");
    sys3(SYS_exit, 1, 0, 0);
}

TOOL_ENTRY;
