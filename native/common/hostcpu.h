/* What a polling engine asks of the host: the time, whether the CPUs are
 * oversubscribed (then spinning costs more than it saves), and draining an
 * eventfd. Shared by the native engines' run loops.
 */
#ifndef HVKIT_HOSTCPU_H
#define HVKIT_HOSTCPU_H

#include <stdint.h>
#include <time.h>

static inline int64_t hv_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* More runnable threads than CPUs (/proc/loadavg's running count, which
 * includes the caller and a vCPU spinning on its completions), read from
 * an open /proc/loadavg; 0 when it cannot tell. */
int hv_cpus_contended(int loadavg_fd, long ncpus);
/* read an eventfd's counter, ignoring errors (a nonblocking fd may be 0) */
void hv_drain_fd(int fd);

#endif
