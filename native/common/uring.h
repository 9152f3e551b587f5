/* io_uring through raw system calls (no liburing), shared by the native
 * engines (NVMe and virtio-blk): set-up, queueing a read or write, and
 * submitting/reaping. One thread owns a ring.
 */
#ifndef HVKIT_URING_H
#define HVKIT_URING_H

#include <stddef.h>
#include <stdint.h>
#include <linux/io_uring.h>

struct uring {
    int fd;
    unsigned entries;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *sq_ring, *cq_ring;
    size_t sq_ring_sz, cq_ring_sz, sqes_sz;
};

/* a ring of ``entries`` submission slots in *slot, unless one is there
 * already; 0 or -errno (*slot stays NULL) */
int uring_open(struct uring **slot, unsigned entries);
/* unmap and close (NULL is fine) */
void uring_close(struct uring *u);
/* queue one read/write of [buf, buf+len) at file offset off; the caller
 * keeps the queued count within ``entries`` */
void uring_prep(struct uring *u, int write, int fd, void *buf, uint32_t len,
                uint64_t off, uint64_t tag);
/* the same with an iovec array (IORING_OP_READV/WRITEV) */
void uring_prepv(struct uring *u, int write, int fd, const void *iov, uint32_t niov,
                 uint64_t off, uint64_t tag);
/* submit n queued operations and wait for all; results[tag] = res.
 * 0, or -errno if the ring failed (the caller then does the I/O itself) */
int uring_run(struct uring *u, unsigned n, int32_t *results);
/* submit up to n queued operations without waiting: how many the kernel
 * took, or -errno */
int uring_submit(struct uring *u, unsigned n);
/* block until at least one completion is there (EINTR is not an error) */
void uring_wait(struct uring *u);

#endif
