#define _GNU_SOURCE
#include "runloop.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

int hv_sink_init(hv_sink *s, size_t limit)
{
    memset(s, 0, sizeof(*s));
    s->fd = -1;
    s->limit = limit;
    return pthread_mutex_init(&s->lock, NULL);
}

void hv_sink_free(hv_sink *s)
{
    free(s->buf);
    s->buf = NULL;
    s->len = s->cap = 0;
    pthread_mutex_destroy(&s->lock);
}

static void sink_append(hv_sink *s, const unsigned char *p, size_t n)
{
    if (s->len + n > s->cap) {
        size_t cap = s->cap ? s->cap : 4096;
        while (cap < s->len + n)
            cap *= 2;
        if (s->limit && cap > s->limit)
            cap = s->limit;
        if (cap > s->cap) {
            unsigned char *nb = realloc(s->buf, cap);
            if (nb) {
                s->buf = nb;
                s->cap = cap;
            }
        }
    }
    size_t room = s->cap - s->len;
    size_t take = n < room ? n : room;
    if (take)
        memcpy(s->buf + s->len, p, take);
    s->len += take;
    s->dropped += n - take;
}

/* Live output to s->fd without ever blocking for long: wait up to
 * HV_SINK_STALL_MS for room, then mark the fd stalled and drop what does not
 * fit (counted in fd_dropped) until it drains again. Chunks of PIPE_BUF bytes
 * never block once poll() reports room in a pipe. */
static void sink_to_fd(hv_sink *s, const unsigned char *p, size_t n)
{
    size_t off = 0;
    while (off < n) {
        struct pollfd pfd = { .fd = s->fd, .events = POLLOUT };
        int pr = poll(&pfd, 1, s->stalled ? 0 : HV_SINK_STALL_MS);
        if (pr < 0 && errno == EINTR)
            continue;
        if (pr == 0)
            s->stalled = 1;
        if (pr <= 0 || !(pfd.revents & POLLOUT))
            break;   /* full, closed or invalid: a console must not stop the guest */
        s->stalled = 0;
        size_t chunk = n - off < PIPE_BUF ? n - off : PIPE_BUF;
        ssize_t w = write(s->fd, p + off, chunk);
        if (w < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (w <= 0)
            break;
        off += (size_t)w;
    }
    s->fd_dropped += n - off;
}

void hv_sink_write(hv_sink *s, const unsigned char *p, size_t n)
{
    pthread_mutex_lock(&s->lock);
    sink_append(s, p, n);
    if (s->fd >= 0)
        sink_to_fd(s, p, n);
    pthread_mutex_unlock(&s->lock);
}

void hv_sink_lock(hv_sink *s) { pthread_mutex_lock(&s->lock); }
void hv_sink_unlock(hv_sink *s) { pthread_mutex_unlock(&s->lock); }

static void kick_handler(int sig) { (void)sig; }

int hv_kick_signal(void) { return SIGRTMIN; }

int hv_kick_signal_install(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = kick_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;   /* no SA_RESTART: KVM_RUN must return EINTR */
    return sigaction(SIGRTMIN, &sa, NULL);
}

void hv_runner_init(hv_runner *r, int fd, int vcpu_id, struct kvm_run *run,
                    size_t map_size, hv_ports *ports, hv_vmstate *vm)
{
    memset(r, 0, sizeof(*r));
    r->fd = fd;
    r->vcpu_id = vcpu_id;
    r->run = run;
    r->map_size = map_size;
    r->ports = ports;
    r->vm = vm;
    pthread_mutex_init(&r->lock, NULL);
}

void hv_runner_kick(hv_runner *r)
{
    __atomic_store_n(&r->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_lock(&r->lock);
    if (r->in_run)
        pthread_kill(r->thread, SIGRTMIN);
    pthread_mutex_unlock(&r->lock);
}

static int ports_add(hv_ports *ports, uint16_t base, uint16_t len, int kind, void *state,
                     hv_port_fn fn)
{
    int n = ports->n;
    if (n >= HV_MAX_PORTS || len == 0 || (uint32_t)base + len > 0x10000)
        return -1;
    if ((kind == HV_PORT_CALLBACK) != (fn != NULL))
        return -1;
    hv_port *p = &ports->ports[n];
    p->base = base;
    p->len = len;
    p->kind = kind;
    p->state = state;
    p->fn = fn;
    p->hits = 0;
    /* Publish the filled entry to vCPU threads already running. */
    __atomic_store_n(&ports->n, n + 1, __ATOMIC_RELEASE);
    return n;
}

int hv_ports_add(hv_ports *ports, uint16_t base, uint16_t len, int kind, void *state)
{
    return ports_add(ports, base, len, kind, state, NULL);
}

int hv_ports_add_callback(hv_ports *ports, uint16_t base, uint16_t len, hv_port_fn fn,
                          void *state)
{
    return ports_add(ports, base, len, HV_PORT_CALLBACK, state, fn);
}

int hv_ports_remove(hv_ports *ports, uint16_t base, uint16_t len)
{
    int removed = 0;
    int n = __atomic_load_n(&ports->n, __ATOMIC_ACQUIRE);
    for (int i = 0; i < n; i++) {
        hv_port *p = &ports->ports[i];
        if (p->base == base && p->len == len &&
            __atomic_load_n(&p->kind, __ATOMIC_ACQUIRE) != HV_PORT_REMOVED) {
            __atomic_store_n(&p->kind, HV_PORT_REMOVED, __ATOMIC_RELEASE);
            removed++;
        }
    }
    return removed;
}

int hv_io_data_ok(const struct kvm_run *run, size_t map_size)
{
    uint64_t off = run->io.data_offset;
    uint64_t n = (uint64_t)run->io.size * run->io.count;
    if (run->io.size != 1 && run->io.size != 2 && run->io.size != 4)
        return 0;
    if (off < sizeof(struct kvm_run) || off > map_size)
        return 0;
    return n <= map_size - off;
}

int hv_serve_port(hv_runner *r, struct kvm_run *run)
{
    hv_ports *ports = r->ports;
    if (!ports)
        return 0;
    /* Python refuses what fails here, with an error that says why. */
    if (!hv_io_data_ok(run, r->map_size))
        return 0;
    uint32_t port = run->io.port;
    uint32_t size = run->io.size, count = run->io.count;
    unsigned char *data = (unsigned char *)run + run->io.data_offset;
    int n = __atomic_load_n(&ports->n, __ATOMIC_ACQUIRE);
    for (int i = 0; i < n; i++) {
        hv_port *p = &ports->ports[i];
        if (port < p->base || port >= (uint32_t)p->base + p->len)
            continue;
        int kind = __atomic_load_n(&p->kind, __ATOMIC_ACQUIRE);
        if (kind == HV_PORT_REMOVED)
            continue;
        /* An access that runs past the range's end is the bus's to refuse. */
        if (port + size > (uint32_t)p->base + p->len)
            return 0;
        uint32_t off = port - p->base;
        switch (kind) {
        case HV_PORT_NULL:
            if (run->io.direction == KVM_EXIT_IO_IN)
                memset(data, 0, (size_t)size * count);
            p->hits++;
            return 1;
        case HV_PORT_EXIT: {
            if (run->io.direction != KVM_EXIT_IO_OUT) {
                memset(data, 0, (size_t)size * count);
                return 1;
            }
            uint64_t v = 0;
            memcpy(&v, data, size);
            p->hits++;
            r->vm->exit_code = (int64_t)v;
            r->vm->exit_vcpu = r->vcpu_id;
            __atomic_store_n(&r->vm->exit_requested, 1, __ATOMIC_SEQ_CST);
            return 2;
        }
        case HV_PORT_SERIAL: {
            hv_serial *s = p->state;
            if (size != 1)
                return 0;
            if (off == 0 && run->io.direction == KVM_EXIT_IO_OUT &&
                !s->dlab && !s->thri && !s->loopback) {
                hv_sink_write(s->sink, data, count);
                p->hits++;
                return 1;
            }
            if (off == 5 && run->io.direction == KVM_EXIT_IO_IN) {
                /* THR empty and transmitter idle: output never backs up. */
                unsigned char lsr = 0x60 | (s->rx_ready ? 1 : 0);
                memset(data, lsr, count);
                p->hits++;
                return 1;
            }
            return 0;
        }
        case HV_PORT_CALLBACK:
            if (p->fn(p->state, r->owner, run, off, data) < 0)
                return 3;
            p->hits++;
            return 4;
        default:
            return 0;
        }
    }
    return 0;
}

int hv_run(hv_runner *r)
{
    struct kvm_run *run = r->run;
    pthread_mutex_lock(&r->lock);
    r->thread = pthread_self();
    r->in_run = 1;
    pthread_mutex_unlock(&r->lock);

    int result;
    for (;;) {
        if (r->vm && __atomic_load_n(&r->vm->exit_requested, __ATOMIC_SEQ_CST)) {
            result = HV_RUN_GUEST_EXIT;
            break;
        }
        int rc = ioctl(r->fd, KVM_RUN, 0);
        r->kvm_runs++;
        if (rc < 0) {
            int err = errno;
            if (err == EINTR) {
                r->exit_counts[KVM_EXIT_INTR]++;
                result = HV_RUN_INTERRUPTED;
                break;
            }
            if (err == EAGAIN)
                continue;
            result = -err;
            break;
        }
        uint32_t reason = run->exit_reason;
        if (reason < HV_EXIT_REASONS)
            r->exit_counts[reason]++;
        if (reason == KVM_EXIT_IO) {
            int h = hv_serve_port(r, run);
            if (h == 1) {
                r->native_exits++;
                continue;
            }
            if (h == 4) {
                r->callback_exits++;
                continue;
            }
            if (h == 3) {
                result = HV_RUN_CALLBACK_ERROR;
                break;
            }
            if (h == 2) {
                r->native_exits++;
                result = HV_RUN_GUEST_EXIT;
                break;
            }
        }
        result = HV_RUN_EXIT;
        break;
    }

    pthread_mutex_lock(&r->lock);
    r->in_run = 0;
    pthread_mutex_unlock(&r->lock);
    return result;
}
