/* io_uring through raw system calls: see uring.h. */
#define _GNU_SOURCE
#include "uring.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

void uring_close(struct uring *u)
{
    if (!u)
        return;
    if (u->sqes)
        munmap(u->sqes, u->sqes_sz);
    if (u->cq_ring && u->cq_ring != u->sq_ring)
        munmap(u->cq_ring, u->cq_ring_sz);
    if (u->sq_ring)
        munmap(u->sq_ring, u->sq_ring_sz);
    if (u->fd >= 0)
        close(u->fd);
    free(u);
}

int uring_open(struct uring **slot, unsigned entries)
{
    if (*slot)
        return 0;
    struct uring *u = calloc(1, sizeof(*u));
    if (!u)
        return -ENOMEM;
    u->fd = -1;
    struct io_uring_params p;
    memset(&p, 0, sizeof(p));
    int fd = (int)syscall(__NR_io_uring_setup, entries, &p);
    if (fd < 0) {
        int err = -errno;
        uring_close(u);
        return err;
    }
    u->fd = fd;
    u->entries = p.sq_entries;
    u->sq_ring_sz = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    u->cq_ring_sz = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    int single = (p.features & IORING_FEAT_SINGLE_MMAP) != 0;
    if (single && u->cq_ring_sz > u->sq_ring_sz)
        u->sq_ring_sz = u->cq_ring_sz;
    u->sq_ring = mmap(NULL, u->sq_ring_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                      fd, IORING_OFF_SQ_RING);
    if (u->sq_ring == MAP_FAILED) {
        u->sq_ring = NULL;
        goto fail;
    }
    if (single) {
        u->cq_ring = u->sq_ring;
    } else {
        u->cq_ring = mmap(NULL, u->cq_ring_sz, PROT_READ | PROT_WRITE,
                          MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_CQ_RING);
        if (u->cq_ring == MAP_FAILED) {
            u->cq_ring = NULL;
            goto fail;
        }
    }
    u->sqes_sz = p.sq_entries * sizeof(struct io_uring_sqe);
    u->sqes = mmap(NULL, u->sqes_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                   fd, IORING_OFF_SQES);
    if (u->sqes == MAP_FAILED) {
        u->sqes = NULL;
        goto fail;
    }
    uint8_t *sq = u->sq_ring, *cq = u->cq_ring;
    u->sq_head = (unsigned *)(sq + p.sq_off.head);
    u->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    u->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    u->sq_array = (unsigned *)(sq + p.sq_off.array);
    u->cq_head = (unsigned *)(cq + p.cq_off.head);
    u->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    u->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    u->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    *slot = u;
    return 0;
fail:;
    int err = -errno;
    uring_close(u);
    return err ? err : -ENOMEM;
}

static void prep(struct uring *u, int opcode, int fd, uint64_t addr, uint32_t len,
                 uint64_t off, uint64_t tag)
{
    unsigned tail = *u->sq_tail;
    unsigned idx = tail & *u->sq_mask;
    struct io_uring_sqe *sqe = &u->sqes[idx];
    memset(sqe, 0, sizeof(*sqe));
    sqe->opcode = (uint8_t)opcode;
    sqe->fd = fd;
    sqe->addr = addr;
    sqe->len = len;
    sqe->off = off;
    sqe->user_data = tag;
    u->sq_array[idx] = idx;
    __atomic_store_n(u->sq_tail, tail + 1, __ATOMIC_RELEASE);
}

void uring_prep(struct uring *u, int write, int fd, void *buf, uint32_t len,
                uint64_t off, uint64_t tag)
{
    prep(u, write ? IORING_OP_WRITE : IORING_OP_READ, fd, (uint64_t)(uintptr_t)buf, len,
         off, tag);
}

void uring_prepv(struct uring *u, int write, int fd, const void *iov, uint32_t niov,
                 uint64_t off, uint64_t tag)
{
    prep(u, write ? IORING_OP_WRITEV : IORING_OP_READV, fd, (uint64_t)(uintptr_t)iov, niov,
         off, tag);
}

int uring_run(struct uring *u, unsigned n, int32_t *results)
{
    unsigned submitted = 0, reaped = 0;
    int broken = 0;
    while (reaped < n) {
        unsigned to_submit = broken ? 0 : n - submitted;
        int r = (int)syscall(__NR_io_uring_enter, u->fd, to_submit, 1,
                             IORING_ENTER_GETEVENTS, NULL, 0);
        if (r >= 0) {
            submitted += (unsigned)r;
        } else if (errno != EINTR && errno != EAGAIN && errno != EBUSY) {
            if (submitted == reaped)
                return -errno;        /* nothing in flight: give up on the ring */
            broken = 1;               /* wait for what is in flight, then give up */
        }
        unsigned head = *u->cq_head;
        unsigned tail = __atomic_load_n(u->cq_tail, __ATOMIC_ACQUIRE);
        while (head != tail) {
            struct io_uring_cqe *c = &u->cqes[head & *u->cq_mask];
            results[c->user_data] = c->res;
            head++;
            reaped++;
        }
        __atomic_store_n(u->cq_head, head, __ATOMIC_RELEASE);
        if (broken && submitted == reaped)
            return -EIO;
    }
    return 0;
}

int uring_submit(struct uring *u, unsigned n)
{
    int r = (int)syscall(__NR_io_uring_enter, u->fd, n, 0, 0, NULL, 0);
    return r < 0 ? -errno : r;
}

void uring_wait(struct uring *u)
{
    (void)syscall(__NR_io_uring_enter, u->fd, 0, 1, IORING_ENTER_GETEVENTS, NULL, 0);
}
