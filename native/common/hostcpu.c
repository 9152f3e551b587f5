/* See hostcpu.h. */
#include "hostcpu.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int hv_cpus_contended(int loadavg_fd, long ncpus)
{
    if (loadavg_fd < 0 || ncpus < 1)
        return 0;
    char buf[128];
    ssize_t n = pread(loadavg_fd, buf, sizeof(buf) - 1, 0);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    char *p = buf;
    for (int i = 0; i < 3; i++) {
        p = strchr(p, ' ');
        if (!p)
            return 0;
        p++;
    }
    return strtol(p, NULL, 10) > ncpus;
}

void hv_drain_fd(int fd)
{
    uint64_t v;
    ssize_t r = read(fd, &v, sizeof(v));
    (void)r;
}
