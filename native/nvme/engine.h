/* The NVMe accelerator's I/O queue engine in C.
 *
 * A port of hvkit/devices/nvme/engine.py (QueueEngine), io.py
 * (IoCommandSet) and prp.py (map_prps) for namespaces backed by a plain
 * file descriptor. Same rings, doorbells, EventIdx, phase, coalescing,
 * control-page layout and NVMe statuses as the Python engine, which stays
 * the reference (tests compare the two) and the fallback for backends
 * without an fd.
 *
 * Threading: one thread owns an engine. The control calls (create_cq, ...)
 * and nvme_run() are never concurrent; the Python module calls the former
 * with the GIL held and the latter without it.
 */
#ifndef HVKIT_NVME_ENGINE_H
#define HVKIT_NVME_ENGINE_H

#include <stdint.h>
#include <stddef.h>

#include "guestmem.h"

struct uring;

/* control page layout: see engine.py */
#define NVME_CTRL_PAGE_SIZE   8192
#define NVME_STATE_BASE       4096
#define NVME_QUEUE_STATE_BASE (NVME_STATE_BASE + 64)
#define NVME_QUEUE_STATE_SIZE 16
#define NVME_MAX_QID ((NVME_CTRL_PAGE_SIZE - NVME_QUEUE_STATE_BASE) / NVME_QUEUE_STATE_SIZE - 1)
/* counters, in engine.py's COUNTERS order */
enum { NVME_C_BYTES_READ, NVME_C_BYTES_WRITTEN, NVME_C_READ_COMMANDS, NVME_C_WRITE_COMMANDS,
       NVME_C_MEDIA_ERRORS, NVME_C_COMPLETIONS, NVME_C_PASSES, NVME_C_GENERATION };

#define NVME_MAX_REGIONS    32
#define NVME_MAX_NAMESPACES 64
#define NVME_QID_LIMIT      65536     /* qids are 16 bits */

struct nvme_ns {
    uint32_t nsid;
    int fd;
    int lba_shift;
    uint64_t nlb;          /* size >> lba_shift */
    uint64_t size;         /* bytes (the backend's size) */
    int read_only;
    uint32_t align;        /* O_DIRECT alignment, 1 if buffered */
};

struct nvme_sq {
    int used;
    uint16_t qid, cqid;
    uint64_t gpa;
    uint32_t size, head, tail;
};

struct nvme_cq {
    int used;
    uint16_t qid;
    uint64_t gpa;
    uint32_t size, head, tail, phase, vector;
    int ien;
    uint32_t pending_irq;
    int blocked;
    uint32_t reserved;     /* entries owed to fetched commands not yet posted */
};

/* a fetched command whose completion is not posted yet (a batch of
 * reads/writes in flight together; posted in fetch order) */
#define NVME_BATCH 64
#define NVME_RING_OPS 256
struct nvme_pending {
    uint16_t cqid, sqid, cid, sqhd;
    uint16_t status;       /* final status, or NVME_PENDING_IO */
    uint8_t write, fua;
    struct nvme_ns *ns;
    uint64_t offset, length;
    uint32_t run0, nruns;
    uint32_t outstanding;  /* io_uring operations not reaped yet (the pipeline) */
};
#define NVME_PENDING_IO 0xFFFF
/* the pipeline of nvme_run: commands in flight, completions posted in fetch
 * order as soon as every earlier command is done */
#define NVME_FIFO 64

struct nvme_stats {
    uint64_t bytes_read, bytes_written, read_commands, write_commands, media_errors;
};

/* what nvme_run did and decided, for benchmarks and tuning (times in ns) */
struct nvme_run_stats {
    uint64_t passes;          /* engine passes */
    uint64_t work_passes;     /* ... that ran at least one command */
    uint64_t commands;        /* commands run by nvme_run */
    uint64_t max_pass;        /* most commands in one pass */
    uint64_t poll_hits;       /* work found by polling, no kick needed */
    uint64_t poll_expired;    /* windows that ran out: armed EventIdx, slept */
    uint64_t preempted;       /* passes that lost the CPU while polling: slept */
    uint64_t rearm_saves;     /* work seen right after arming EventIdx */
    uint64_t kicks;           /* sleeps ended by a doorbell (the guest exited) */
    uint64_t timeouts;        /* sleeps that ran their 1 s */
    uint64_t grows, shrinks;  /* poll window decisions */
    uint64_t contended;       /* times polling stopped: more runnable threads than CPUs */
    uint64_t work_ns, io_ns, poll_ns, sleep_ns;
    int64_t window_ns, window_min_ns, window_max_ns;
};

struct nvme_engine {
    struct hv_region regions[NVME_MAX_REGIONS];
    int nregions;
    struct nvme_ns ns[NVME_MAX_NAMESPACES];
    int nns;
    struct nvme_sq *sqs;            /* [NVME_QID_LIMIT] */
    struct nvme_cq *cqs;            /* [NVME_QID_LIMIT] */
    uint16_t sq_order[NVME_QID_LIMIT];   /* SQ ids in creation order */
    int nsq;
    uint16_t cq_order[NVME_QID_LIMIT];
    int ncq;
    int dbbuf;
    uint64_t shadow_gpa, eventidx_gpa;
    uint32_t coalesce_threshold;
    uint8_t coalesce_disabled[NVME_QID_LIMIT / 8];
    uint8_t *page;                  /* the 8 KiB control page */
    int *irq_fds;
    int nirq;
    int kick_fd, ctrl_fd;
    uint64_t max_transfer;
    struct nvme_stats stats;
    uint64_t shadow_errors;
    uint64_t ring_errors;
    /* scratch, sized for max_transfer */
    struct nvme_run_entry { uint64_t gpa, len; uint8_t *hva; } *runs;
    size_t max_runs;       /* per command */
    size_t pool_runs, run_base;    /* e->runs is a pool for the batch */
    struct nvme_pending batch[NVME_BATCH];
    int nbatch;
    struct uring *uring;   /* io_uring for the batch, NULL: synchronous I/O */
    int32_t *results;      /* [pool_runs] */
    uint64_t batches, batched_ios;
    uint8_t *bounce;                /* aligned, for O_DIRECT with unaligned buffers */
    size_t bounce_size;
    uint8_t *zeros;                 /* read-only zeros for Write Zeroes without fallocate */
    struct nvme_run_stats rs;
    int64_t window;                 /* the adaptive poll window, kept across nvme_run calls */
    int window_set;
    int loadavg_fd;                 /* /proc/loadavg: runnable threads, -1 if unreadable */
    int poll_always;                /* poll within the window even on a contended host */
    long ncpus;
    /* the pipeline: a FIFO of fetched reads/writes whose I/O runs through
     * io_uring while more are fetched; its runs live in e->runs from
     * fifo_base, max_runs per slot */
    struct nvme_pending fifo[NVME_FIFO];
    uint32_t fifo_head, fifo_count;
    size_t fifo_base;
    uint32_t queued_ops, inflight_ops;
};

/* set-up / tear-down; 0 or -errno */
int nvme_engine_init(struct nvme_engine *e, uint8_t *page, uint64_t max_transfer);
/* run batches of reads/writes concurrently through io_uring (0 or -errno;
 * without it, I/O is synchronous) */
int nvme_enable_uring(struct nvme_engine *e);
void nvme_engine_free(struct nvme_engine *e);
int nvme_add_region(struct nvme_engine *e, uint64_t gpa, uint64_t size, uint8_t *hva);
int nvme_add_ns(struct nvme_engine *e, uint32_t nsid, int fd, int lba_shift, uint64_t size,
                int read_only, uint32_t align);

/* control plane (engine.py names) */
/* -EINVAL for a size of 0 or over 65536, or a tail/head not inside the ring */
int nvme_create_cq(struct nvme_engine *e, uint16_t qid, uint64_t gpa, uint32_t size,
                   uint32_t vector, int ien, uint32_t tail, uint32_t phase);
int nvme_create_sq(struct nvme_engine *e, uint16_t qid, uint64_t gpa, uint32_t size,
                   uint16_t cqid, uint32_t head);
void nvme_delete_sq(struct nvme_engine *e, uint16_t qid);
void nvme_delete_cq(struct nvme_engine *e, uint16_t qid);
void nvme_reset(struct nvme_engine *e);
void nvme_set_dbbuf(struct nvme_engine *e, uint64_t shadow, uint64_t eventidx, int initialise);
void nvme_set_coalescing(struct nvme_engine *e, uint32_t threshold);
void nvme_disable_coalescing(struct nvme_engine *e, uint32_t vector);
void nvme_recover(struct nvme_engine *e);
void nvme_flush_interrupts(struct nvme_engine *e);
void nvme_update_event_indexes(struct nvme_engine *e);
int nvme_has_work(struct nvme_engine *e);
void nvme_publish_counters(struct nvme_engine *e);

/* the data path */
int nvme_process(struct nvme_engine *e, int budget);     /* budget < 0: default */
/* One step of the pipeline: fetch what the SQs hold (up to budget), start
 * its I/O without waiting, post the completions that are done in fetch
 * order, raise the interrupts owed. Returns the commands fetched plus
 * those completed. nvme_drain waits for everything in flight and posts it.
 * nvme_inflight: commands fetched and not yet posted. */
int nvme_pump(struct nvme_engine *e, int budget);
void nvme_drain(struct nvme_engine *e);
int nvme_inflight(struct nvme_engine *e);
/* one I/O command (64-byte SQE) -> status (no DNR), for tests */
uint16_t nvme_execute(struct nvme_engine *e, const uint8_t *sqe);

/* The loop: process, poll the doorbells for up to poll_ns after the last
 * command (an adaptive window), then arm EventIdx and sleep on kick_fd.
 * Returns 1 when the control fd is readable (or hung up), -errno on a poll
 * failure. */
int nvme_run(struct nvme_engine *e, int64_t poll_ns);

#endif
