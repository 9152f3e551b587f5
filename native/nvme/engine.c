/* The NVMe accelerator's I/O queue engine in C: see engine.h.
 *
 * Every guest-provided address, length and index is checked before use;
 * the rules and NVMe statuses are those of prp.py and io.py. Memory another
 * party reads while we write it (completion dwords, shadow doorbells, the
 * control page) is written one aligned word at a time in single stores, as
 * engine.py's store_u32 does; the completion dword carrying the phase bit is
 * stored last, after a release fence.
 */
#define _GNU_SOURCE
#include "engine.h"
#include "fileio.h"
#include "guestmem.h"
#include "hostcpu.h"
#include "uring.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/io_uring.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the NVMe engine assumes a little-endian host"
#endif

/* NVMe statuses (spec.py) */
#define SUCCESS                   0x0000
#define INVALID_OPCODE            0x0001
#define INVALID_FIELD             0x0002
#define DATA_TRANSFER_ERROR       0x0004
#define INTERNAL_ERROR            0x0006
#define INVALID_NAMESPACE         0x000B
#define PRP_OFFSET_INVALID        0x0013
#define NAMESPACE_WRITE_PROTECTED 0x0020
#define LBA_OUT_OF_RANGE          0x0080
#define WRITE_FAULT               0x0280
#define UNRECOVERED_READ_ERROR    0x0281
#define STATUS_DNR                (1u << 14)

#define IO_FLUSH        0x00
#define IO_WRITE        0x01
#define IO_READ         0x02
#define IO_WRITE_ZEROES 0x08
#define IO_DSM          0x09

#define SQE_SIZE 64
#define CQE_SIZE 16
#define PAGE_SIZE_NVME 4096ull
#define DSM_RANGE_SIZE 16
#define DSM_ATTR_DEALLOCATE (1u << 2)
#define BROADCAST_NSID 0xFFFFFFFFu




/* -- io_uring (native/common/uring.c) ------------------------------------- */

static void uring_free(struct nvme_engine *e)
{
    uring_close(e->uring);
    e->uring = NULL;
}

int nvme_enable_uring(struct nvme_engine *e)
{
    return uring_open(&e->uring, NVME_RING_OPS);
}

#define now_ns hv_now_ns

/* -- words shared with other CPUs ---------------------------------------- */

static inline uint32_t ld32(const uint8_t *p)
{
    if (((uintptr_t)p & 3) == 0)
        return __atomic_load_n((const uint32_t *)p, __ATOMIC_ACQUIRE);
    uint32_t v;
    memcpy(&v, p, 4);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return v;
}

static inline void st32(uint8_t *p, uint32_t v)
{
    if (((uintptr_t)p & 3) == 0) {
        __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELEASE);
        return;
    }
    __atomic_thread_fence(__ATOMIC_RELEASE);
    memcpy(p, &v, 4);
}

static inline uint64_t ld64(const uint8_t *p)
{
    return __atomic_load_n((const uint64_t *)p, __ATOMIC_RELAXED);
}

static inline void st64(uint8_t *p, uint64_t v)
{
    __atomic_store_n((uint64_t *)p, v, __ATOMIC_RELEASE);
}

/* -- guest memory --------------------------------------------------------- */

/* guest RAM lookups (native/common/guestmem.c) on the engine's regions */
static uint8_t *gm_ptr(struct nvme_engine *e, uint64_t gpa, uint64_t len)
{
    return hv_gm_ptr(e->regions, e->nregions, gpa, len);
}

static int gm_region(struct nvme_engine *e, uint64_t gpa, uint64_t len)
{
    return hv_gm_index(e->regions, e->nregions, gpa, len);
}

static int gm_read(struct nvme_engine *e, uint64_t gpa, uint64_t len, void *out)
{
    return hv_gm_read(e->regions, e->nregions, gpa, len, out);
}

static void publish_queue_at(struct nvme_engine *e, uint32_t qid, int64_t sq_head);
#define publish_queue(e, qid) publish_queue_at((e), (qid), -1)

/* -- control page ----------------------------------------------------------- */

/* sq_head: the SQ head to publish (-1: the current one). A batch publishes
 * the head as of the command it completes, so that a restart fetches again
 * every command whose completion was not posted. */
static void publish_queue_at(struct nvme_engine *e, uint32_t qid, int64_t sq_head)
{
    if (qid > NVME_MAX_QID)
        return;
    uint8_t *off = e->page + NVME_QUEUE_STATE_BASE + NVME_QUEUE_STATE_SIZE * qid;
    if (e->sqs[qid].used)
        st32(off, sq_head < 0 ? e->sqs[qid].head : (uint32_t)sq_head);
    if (e->cqs[qid].used) {
        st32(off + 4, e->cqs[qid].tail);
        st32(off + 8, e->cqs[qid].phase);
    }
}

static void bump(struct nvme_engine *e, int counter, uint64_t n)
{
    uint8_t *p = e->page + NVME_STATE_BASE + 8 * counter;
    st64(p, ld64(p) + n);
}

void nvme_publish_counters(struct nvme_engine *e)
{
    uint8_t *p = e->page + NVME_STATE_BASE;
    st64(p + 8 * NVME_C_BYTES_READ, e->stats.bytes_read);
    st64(p + 8 * NVME_C_BYTES_WRITTEN, e->stats.bytes_written);
    st64(p + 8 * NVME_C_READ_COMMANDS, e->stats.read_commands);
    st64(p + 8 * NVME_C_WRITE_COMMANDS, e->stats.write_commands);
    st64(p + 8 * NVME_C_MEDIA_ERRORS, e->stats.media_errors);
}

/* -- doorbells ------------------------------------------------------------------ */

static int shadow_read(struct nvme_engine *e, uint64_t base, uint32_t qid, int cq, uint32_t *out)
{
    uint8_t *p = gm_ptr(e, base + 4ull * (2ull * qid + (cq ? 1 : 0)), 4);
    if (!p) {
        e->shadow_errors++;
        return -1;
    }
    *out = ld32(p);
    return 0;
}

static void shadow_write(struct nvme_engine *e, uint64_t base, uint32_t qid, int cq, uint32_t v)
{
    uint8_t *p = gm_ptr(e, base + 4ull * (2ull * qid + (cq ? 1 : 0)), 4);
    if (!p) {
        e->shadow_errors++;
        return;
    }
    st32(p, v);
}

static int doorbell(struct nvme_engine *e, uint32_t qid, int cq, uint32_t *out)
{
    if (e->dbbuf && qid)
        return shadow_read(e, e->shadow_gpa, qid, cq, out);
    if (qid >= 512) {               /* mirror page holds qids < 512 */
        *out = 0;
        return 0;
    }
    *out = ld32(e->page + 8 * qid + (cq ? 4 : 0));
    return 0;
}

static void refresh_cq(struct nvme_engine *e, struct nvme_cq *cq)
{
    uint32_t head;
    if (doorbell(e, cq->qid, 1, &head) == 0 && head < cq->size)
        cq->head = head;
}

static void refresh(struct nvme_engine *e, struct nvme_sq *sq)
{
    uint32_t tail;
    if (doorbell(e, sq->qid, 0, &tail) == 0 && tail < sq->size)
        sq->tail = tail;
    struct nvme_cq *cq = &e->cqs[sq->cqid];
    if (cq->used)
        refresh_cq(e, cq);
}

static inline int cq_full(const struct nvme_cq *cq)
{
    return (cq->tail + 1) % cq->size == cq->head;
}

/* full once the entries owed to the batch are posted */
static inline int cq_full_r(const struct nvme_cq *cq)
{
    return (cq->tail + cq->reserved + 1) % cq->size == cq->head;
}

/* -- set-up ------------------------------------------------------------------------ */

int nvme_engine_init(struct nvme_engine *e, uint8_t *page, uint64_t max_transfer)
{
    memset(e, 0, sizeof(*e));
    e->page = page;
    e->kick_fd = e->ctrl_fd = -1;
    e->max_transfer = max_transfer;
    e->loadavg_fd = open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
    e->ncpus = sysconf(_SC_NPROCESSORS_ONLN);
    e->sqs = calloc(NVME_QID_LIMIT, sizeof(*e->sqs));
    e->cqs = calloc(NVME_QID_LIMIT, sizeof(*e->cqs));
    e->max_runs = max_transfer / PAGE_SIZE_NVME + 2;
    if (e->max_runs < (DSM_RANGE_SIZE * 256) / PAGE_SIZE_NVME + 2)
        e->max_runs = (DSM_RANGE_SIZE * 256) / PAGE_SIZE_NVME + 2;
    e->fifo_base = e->max_runs > NVME_RING_OPS ? e->max_runs : NVME_RING_OPS;
    e->pool_runs = e->fifo_base + NVME_FIFO * e->max_runs;
    e->runs = calloc(e->pool_runs, sizeof(*e->runs));
    e->results = calloc(e->pool_runs, sizeof(*e->results));
    e->bounce_size = HV_BOUNCE_CHUNK + 4096;
    hv_io_buffers(&e->bounce, &e->zeros);
    if (!e->sqs || !e->cqs || !e->runs || !e->results || !e->bounce || !e->zeros) {
        nvme_engine_free(e);
        return -ENOMEM;
    }
    return 0;
}

void nvme_engine_free(struct nvme_engine *e)
{
    if (e->loadavg_fd >= 0)
        close(e->loadavg_fd);
    e->loadavg_fd = -1;
    free(e->sqs);
    free(e->cqs);
    free(e->runs);
    free(e->results);
    uring_free(e);
    hv_io_buffers_free(e->bounce, e->zeros);
    e->zeros = NULL;
    e->sqs = NULL;
    e->cqs = NULL;
    e->runs = NULL;
    e->results = NULL;
    e->bounce = NULL;
}

int nvme_add_region(struct nvme_engine *e, uint64_t gpa, uint64_t size, uint8_t *hva)
{
    return hv_gm_add(e->regions, &e->nregions, NVME_MAX_REGIONS, gpa, size, hva);
}

int nvme_add_ns(struct nvme_engine *e, uint32_t nsid, int fd, int lba_shift, uint64_t size,
                int read_only, uint32_t align)
{
    if (e->nns >= NVME_MAX_NAMESPACES)
        return -ENOSPC;
    if (align == 0 || (align & (align - 1)) || align > 4096)
        return -EINVAL;
    e->ns[e->nns++] = (struct nvme_ns){nsid, fd, lba_shift, size >> lba_shift, size,
                                       read_only, align};
    return 0;
}

static void order_remove(uint16_t *order, int *n, uint16_t qid)
{
    for (int i = 0; i < *n; i++) {
        if (order[i] == qid) {
            memmove(order + i, order + i + 1, (size_t)(*n - i - 1) * sizeof(*order));
            (*n)--;
            return;
        }
    }
}

int nvme_create_cq(struct nvme_engine *e, uint16_t qid, uint64_t gpa, uint32_t size,
                   uint32_t vector, int ien, uint32_t tail, uint32_t phase)
{
    /* a tail at or past the end would never wrap: entries off the ring */
    if (size == 0 || size > NVME_QID_LIMIT || tail >= size || phase > 1)
        return -EINVAL;
    struct nvme_cq *cq = &e->cqs[qid];
    if (!cq->used)
        e->cq_order[e->ncq++] = qid;
    *cq = (struct nvme_cq){.used = 1, .qid = qid, .gpa = gpa, .size = size,
                           .head = tail, .tail = tail, .phase = phase, .vector = vector,
                           .ien = ien};
    if (e->dbbuf && qid)
        shadow_write(e, e->eventidx_gpa, qid, 1, (tail - 1) & 0xFFFF);
    publish_queue(e, qid);
    return 0;
}

int nvme_create_sq(struct nvme_engine *e, uint16_t qid, uint64_t gpa, uint32_t size,
                   uint16_t cqid, uint32_t head)
{
    if (!e->cqs[cqid].used)
        return -ENOENT;
    if (size == 0 || size > NVME_QID_LIMIT || head >= size)
        return -EINVAL;
    struct nvme_sq *sq = &e->sqs[qid];
    if (sq->used)
        order_remove(e->sq_order, &e->nsq, qid);
    e->sq_order[e->nsq++] = qid;
    *sq = (struct nvme_sq){.used = 1, .qid = qid, .cqid = cqid, .gpa = gpa,
                           .size = size, .head = head, .tail = head};
    if (e->dbbuf && qid)
        shadow_write(e, e->eventidx_gpa, qid, 0, head);
    publish_queue(e, qid);
    return 0;
}

void nvme_delete_sq(struct nvme_engine *e, uint16_t qid)
{
    if (!e->sqs[qid].used)
        return;
    e->sqs[qid].used = 0;
    order_remove(e->sq_order, &e->nsq, qid);
}

void nvme_delete_cq(struct nvme_engine *e, uint16_t qid)
{
    if (!e->cqs[qid].used)
        return;
    e->cqs[qid].used = 0;
    order_remove(e->cq_order, &e->ncq, qid);
}

void nvme_reset(struct nvme_engine *e)
{
    for (int i = 0; i < e->nsq; i++)
        e->sqs[e->sq_order[i]].used = 0;
    for (int i = 0; i < e->ncq; i++)
        e->cqs[e->cq_order[i]].used = 0;
    e->nsq = e->ncq = 0;
    e->dbbuf = 0;
    e->coalesce_threshold = 0;
    memset(e->coalesce_disabled, 0, sizeof(e->coalesce_disabled));
}

void nvme_set_dbbuf(struct nvme_engine *e, uint64_t shadow, uint64_t eventidx, int initialise)
{
    if (initialise) {
        for (int i = 0; i < e->nsq; i++) {
            struct nvme_sq *sq = &e->sqs[e->sq_order[i]];
            if (sq->qid) {
                refresh(e, sq);
                shadow_write(e, shadow, sq->qid, 0, sq->tail);
                shadow_write(e, eventidx, sq->qid, 0, sq->tail);
            }
        }
        for (int i = 0; i < e->ncq; i++) {
            struct nvme_cq *cq = &e->cqs[e->cq_order[i]];
            if (cq->qid) {
                shadow_write(e, shadow, cq->qid, 1, cq->head);
                shadow_write(e, eventidx, cq->qid, 1, (cq->head - 1) & 0xFFFF);
            }
        }
    }
    e->dbbuf = 1;
    e->shadow_gpa = shadow;
    e->eventidx_gpa = eventidx;
}

void nvme_set_coalescing(struct nvme_engine *e, uint32_t threshold)
{
    e->coalesce_threshold = threshold;
    memset(e->coalesce_disabled, 0, sizeof(e->coalesce_disabled));
}

void nvme_disable_coalescing(struct nvme_engine *e, uint32_t vector)
{
    if (vector < NVME_QID_LIMIT)
        e->coalesce_disabled[vector / 8] |= (uint8_t)(1u << (vector % 8));
}

static inline int coalesce_off(struct nvme_engine *e, uint32_t vector)
{
    return vector < NVME_QID_LIMIT && (e->coalesce_disabled[vector / 8] >> (vector % 8)) & 1;
}

void nvme_update_event_indexes(struct nvme_engine *e)
{
    if (!e->dbbuf)
        return;
    for (int i = 0; i < e->nsq; i++) {
        struct nvme_sq *sq = &e->sqs[e->sq_order[i]];
        if (sq->qid)
            shadow_write(e, e->eventidx_gpa, sq->qid, 0, sq->tail);
    }
    for (int i = 0; i < e->ncq; i++) {
        struct nvme_cq *cq = &e->cqs[e->cq_order[i]];
        if (cq->qid)
            shadow_write(e, e->eventidx_gpa, cq->qid, 1,
                         cq->blocked ? cq->head : ((cq->head - 1) & 0xFFFF));
    }
}

int nvme_has_work(struct nvme_engine *e)
{
    for (int i = 0; i < e->nsq; i++) {
        struct nvme_sq *sq = &e->sqs[e->sq_order[i]];
        refresh(e, sq);
        if (sq->head != sq->tail) {
            struct nvme_cq *cq = &e->cqs[sq->cqid];
            if (cq->used && !cq_full(cq))
                return 1;
        }
    }
    return 0;
}

/* -- interrupts -------------------------------------------------------------------- */

static void irq(struct nvme_engine *e, uint32_t vector)
{
    if (vector < (uint32_t)e->nirq) {
        uint64_t one = 1;
        ssize_t r = write(e->irq_fds[vector], &one, sizeof(one));
        (void)r;     /* EAGAIN: the counter is saturated, the signal is pending anyway */
    }
}

void nvme_flush_interrupts(struct nvme_engine *e)
{
    /* each vector once, in ascending order, as engine.py does */
    uint32_t vecs[64];
    int nv = 0;
    for (int i = 0; i < e->ncq; i++) {
        struct nvme_cq *cq = &e->cqs[e->cq_order[i]];
        if (!cq->pending_irq)
            continue;
        cq->pending_irq = 0;
        int seen = 0;
        for (int j = 0; j < nv; j++)
            if (vecs[j] == cq->vector)
                seen = 1;
        if (seen)
            continue;
        if (nv < 64)
            vecs[nv++] = cq->vector;
        else
            irq(e, cq->vector);
    }
    for (int i = 1; i < nv; i++)
        for (int j = i; j > 0 && vecs[j - 1] > vecs[j]; j--) {
            uint32_t t = vecs[j];
            vecs[j] = vecs[j - 1];
            vecs[j - 1] = t;
        }
    for (int i = 0; i < nv; i++)
        irq(e, vecs[i]);
}

/* -- completions --------------------------------------------------------------------- */

static int post(struct nvme_engine *e, uint16_t cqid, uint16_t sqid, uint16_t cid,
                uint32_t status, uint32_t dw0, int64_t sqhd_at)
{
    struct nvme_cq *cq = &e->cqs[cqid];
    if (!cq->used)
        return 0;
    if (cq_full(cq)) {
        refresh_cq(e, cq);
        if (cq_full(cq))
            return 0;
    }
    struct nvme_sq *sq = e->sqs[sqid].used ? &e->sqs[sqid] : NULL;
    uint32_t sqhd = sq ? (sqhd_at < 0 ? sq->head : (uint32_t)sqhd_at) : 0;
    if (status)
        status |= STATUS_DNR;
    uint8_t *p = gm_ptr(e, cq->gpa + (uint64_t)cq->tail * CQE_SIZE, CQE_SIZE);
    if (!p) {
        e->ring_errors++;
        return 0;
    }
    /* the host ignores the body until the phase bit flips */
    st32(p, dw0);
    st32(p + 4, 0);
    st32(p + 8, (sqhd & 0xFFFF) | (uint32_t)sqid << 16);
    /* the phase dword last, after the body, in one store */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    st32(p + 12, (uint32_t)cid | (cq->phase & 1) << 16 | (status & 0x7FFF) << 17);
    cq->tail++;
    if (cq->tail == cq->size) {
        cq->tail = 0;
        cq->phase ^= 1;
    }
    publish_queue_at(e, cqid, sqhd_at);
    if (sq && sqid != cqid)
        publish_queue_at(e, sqid, sqhd_at);
    if (cq->ien) {
        cq->pending_irq++;
        uint32_t thr = e->coalesce_threshold;
        if (thr && cqid && !coalesce_off(e, cq->vector) && cq->pending_irq > thr) {
            cq->pending_irq = 0;
            irq(e, cq->vector);
        }
    }
    if (cqid)
        bump(e, NVME_C_COMPLETIONS, 1);
    return 1;
}

void nvme_recover(struct nvme_engine *e)
{
    for (int i = 0; i < e->ncq; i++) {
        struct nvme_cq *cq = &e->cqs[e->cq_order[i]];
        for (uint32_t k = 0; k < cq->size; k++) {
            uint8_t raw[CQE_SIZE];
            if (gm_read(e, cq->gpa + (uint64_t)cq->tail * CQE_SIZE, CQE_SIZE, raw))
                break;
            uint16_t sqhd, sqid;
            uint32_t dw3;
            memcpy(&sqhd, raw + 8, 2);
            memcpy(&sqid, raw + 10, 2);
            memcpy(&dw3, raw + 12, 4);
            if (((dw3 >> 16) & 1) != cq->phase)
                break;
            /* ours names an SQ of this CQ and a head inside it; anything
             * else the guest wrote there itself */
            struct nvme_sq *sq = &e->sqs[sqid];
            if (!sq->used || sq->cqid != cq->qid || sqhd >= sq->size)
                break;
            sq->head = sqhd;
            cq->tail++;
            if (cq->tail == cq->size) {
                cq->tail = 0;
                cq->phase ^= 1;
            }
            cq->pending_irq++;
        }
        publish_queue(e, cq->qid);
    }
    for (int i = 0; i < e->nsq; i++)
        publish_queue(e, e->sq_order[i]);
}

/* -- PRPs (prp.py) --------------------------------------------------------------------- */

/* Fill e->runs with the buffer as (gpa, len, hva) runs, each inside one
 * region, adjacent pages merged. Returns the run count, or -status. */
static int map_prps(struct nvme_engine *e, uint64_t prp1, uint64_t prp2, uint64_t length)
{
    const uint64_t ps = PAGE_SIZE_NVME;
    struct nvme_run_entry *R = e->runs + e->run_base;
    int nruns = 0, last_region = -1;
    if (length == 0)
        return 0;
    if (prp1 & 0x3)
        return -PRP_OFFSET_INVALID;

/* append one page (gpa, n): checked against guest RAM, merged with the last run */
#define ADD_PAGE(GPA, N) do {                                                  \
        uint64_t g_ = (GPA), n_ = (N);                                         \
        int r_ = gm_region(e, g_, n_);                                         \
        if (r_ < 0)                                                            \
            return -DATA_TRANSFER_ERROR;                                       \
        if (nruns && r_ == last_region &&                                      \
            R[nruns - 1].gpa + R[nruns - 1].len == g_) {           \
            R[nruns - 1].len += n_;                                      \
        } else {                                                               \
            if ((size_t)nruns >= e->max_runs)                                  \
                return -INVALID_FIELD;                                         \
            struct hv_region *rg_ = &e->regions[r_];                         \
            R[nruns++] = (struct nvme_run_entry){g_, n_,                 \
                                                   rg_->hva + (g_ - rg_->gpa)}; \
            last_region = r_;                                                  \
        }                                                                      \
    } while (0)

    /* prp.py collects every page first (raising on a malformed entry)
     * and checks RAM afterwards; keep that order of statuses: a bad list
     * entry beats an earlier page outside RAM */
    uint64_t first = ps - (prp1 & (ps - 1));
    if (first > length)
        first = length;
    uint64_t left = length - first;
    /* pass 1: structure (offsets, list reads) */
    uint64_t needed = 0;
    if (left > 0) {
        if (left <= ps) {
            if (prp2 & (ps - 1))
                return -PRP_OFFSET_INVALID;
        } else {
            if (prp2 & 0x7)
                return -PRP_OFFSET_INVALID;
            needed = (left + ps - 1) / ps;
        }
    }
    if (!needed) {
        ADD_PAGE(prp1, first);
        if (left)
            ADD_PAGE(prp2, left);
        return nruns;
    }
    /* a PRP list: walk it into the entry array first (statuses of the walk
     * come before any RAM check of the data pages, as in prp.py) */
    uint64_t *entries = (uint64_t *)e->bounce;     /* scratch: needed <= max_transfer/4K + 1 */
    uint64_t nent = 0, addr = prp2;
    if (needed > e->bounce_size / 8 || needed > e->max_runs)
        return -INVALID_FIELD;     /* unreachable: the length was checked against MDTS */
    while (needed) {
        uint64_t room = (ps - (addr & (ps - 1))) / 8;
        uint64_t count = needed <= room ? needed : room;
        uint64_t chunk[512];
        if (gm_read(e, addr, count * 8, chunk))
            return -DATA_TRANSFER_ERROR;
        uint64_t take = needed <= room ? needed : room - 1;
        for (uint64_t k = 0; k < take; k++) {
            if (chunk[k] & (ps - 1))
                return -PRP_OFFSET_INVALID;
            entries[nent++] = chunk[k];
        }
        needed -= take;
        if (needed) {
            uint64_t nxt = chunk[room - 1];
            if (nxt & (ps - 1))
                return -PRP_OFFSET_INVALID;
            if (nxt == (addr & ~(ps - 1)))
                return -INVALID_FIELD;
            addr = nxt;
        }
    }
    ADD_PAGE(prp1, first);
    for (uint64_t k = 0; k < nent; k++) {
        uint64_t n = left < ps ? left : ps;
        ADD_PAGE(entries[k], n);
        left -= n;
    }
    return nruns;
#undef ADD_PAGE
}

/* -- backend I/O (hvkit/storage/raw.py) ---------------------------------------------------- */

static inline struct hv_file ns_file(const struct nvme_ns *ns)
{
    return (struct hv_file){ns->fd, ns->size, ns->read_only, ns->align};
}

static int ns_io(struct nvme_engine *e, struct nvme_ns *ns, uint64_t offset, uint8_t *buf,
                 uint64_t len, int write)
{
    struct hv_file f = ns_file(ns);
    return hv_file_io(&f, e->bounce, offset, buf, len, write);
}

static int ns_flush(struct nvme_ns *ns)
{
    struct hv_file f = ns_file(ns);
    return hv_file_flush(&f);
}

/* 1 done, 0 not supported here, -errno failure (raw.py _fallocate) */
static int ns_fallocate(struct nvme_ns *ns, int mode, uint64_t off, uint64_t len)
{
    struct hv_file f = ns_file(ns);
    return hv_fallocate(&f, mode, off, len);
}

static int ns_write_zeroes(struct nvme_engine *e, struct nvme_ns *ns, uint64_t off, uint64_t len)
{
    struct hv_file f = ns_file(ns);
    return hv_write_zeroes(&f, e->bounce, e->zeros, off, len);
}

/* -- the NVM command set (io.py) ------------------------------------------------------------ */

struct sqe {
    uint8_t opcode, flags;
    uint16_t cid;
    uint32_t nsid, cdw2, cdw3;
    uint64_t mptr, prp1, prp2;
    uint32_t cdw10, cdw11, cdw12, cdw13, cdw14, cdw15;
};
_Static_assert(sizeof(struct sqe) == SQE_SIZE, "SQE layout");

static struct nvme_ns *find_ns(struct nvme_engine *e, uint32_t nsid)
{
    for (int i = 0; i < e->nns; i++)
        if (e->ns[i].nsid == nsid)
            return &e->ns[i];
    return NULL;
}

static inline int out_of_range(struct nvme_ns *ns, uint64_t slba, uint64_t nlb)
{
    return slba > ns->nlb || nlb > ns->nlb - slba;
}

/* checks of a Read/Write up to its I/O (io.py _rw); the runs go to the
 * pool at e->run_base. Returns the final status, or NVME_PENDING_IO with
 * p filled in. */
static uint16_t prepare_rw(struct nvme_engine *e, const struct sqe *c, int write,
                           struct nvme_pending *p)
{
    struct nvme_ns *ns = find_ns(e, c->nsid);
    if (!ns)
        return INVALID_NAMESPACE;
    uint64_t slba = (uint64_t)c->cdw11 << 32 | c->cdw10;
    uint64_t nlb = (c->cdw12 & 0xFFFF) + 1;
    if (out_of_range(ns, slba, nlb))
        return LBA_OUT_OF_RANGE;
    uint64_t length = nlb << ns->lba_shift;
    if (length > e->max_transfer)
        return INVALID_FIELD;
    if (write && ns->read_only)
        return NAMESPACE_WRITE_PROTECTED;
    int nruns = map_prps(e, c->prp1, c->prp2, length);
    if (nruns < 0)
        return (uint16_t)-nruns;
    p->ns = ns;
    p->write = (uint8_t)write;
    p->fua = (c->cdw12 & (1u << 30)) != 0;
    p->offset = slba << ns->lba_shift;
    p->length = length;
    p->run0 = (uint32_t)e->run_base;
    p->nruns = (uint32_t)nruns;
    return NVME_PENDING_IO;
}

/* can this command's I/O go straight to the fd (no bounce)? */
static int direct_ok(struct nvme_engine *e, const struct nvme_pending *p)
{
    uint64_t a = p->ns->align;
    if (a <= 1)
        return 1;
    uint64_t off = p->offset;
    for (uint32_t i = 0; i < p->nruns; i++) {
        struct nvme_run_entry *r = &e->runs[p->run0 + i];
        if (off % a || r->len % a || (uintptr_t)r->hva % a)
            return 0;
        off += r->len;
    }
    return 1;
}

static int rw_sync(struct nvme_engine *e, const struct nvme_pending *p)
{
    uint64_t offset = p->offset;
    for (uint32_t i = 0; i < p->nruns; i++) {
        struct nvme_run_entry *r = &e->runs[p->run0 + i];
        int rc = ns_io(e, p->ns, offset, r->hva, r->len, p->write);
        if (rc)
            return rc;
        offset += r->len;
    }
    return 0;
}

/* the I/O is done (err = 0 or -errno): FUA, counters, status */
static uint16_t finish_rw(struct nvme_engine *e, const struct nvme_pending *p, int err)
{
    if (!err && p->write && p->fua)
        err = ns_flush(p->ns);
    if (err) {
        e->stats.media_errors++;
        return p->write ? WRITE_FAULT : UNRECOVERED_READ_ERROR;
    }
    if (p->write) {
        e->stats.write_commands++;
        e->stats.bytes_written += p->length;
    } else {
        e->stats.read_commands++;
        e->stats.bytes_read += p->length;
    }
    return SUCCESS;
}

static uint16_t do_rw(struct nvme_engine *e, const struct sqe *c, int write)
{
    struct nvme_pending p;
    e->run_base = 0;
    uint16_t st = prepare_rw(e, c, write, &p);
    if (st != NVME_PENDING_IO)
        return st;
    return finish_rw(e, &p, rw_sync(e, &p));
}

static uint16_t do_flush(struct nvme_engine *e, const struct sqe *c)
{
    if (c->nsid == BROADCAST_NSID) {
        for (int i = 0; i < e->nns; i++)
            if (ns_flush(&e->ns[i])) {
                e->stats.media_errors++;
                return WRITE_FAULT;
            }
        return SUCCESS;
    }
    struct nvme_ns *ns = find_ns(e, c->nsid);
    if (!ns)
        return INVALID_NAMESPACE;
    if (ns_flush(ns)) {
        e->stats.media_errors++;
        return WRITE_FAULT;
    }
    return SUCCESS;
}

static uint16_t do_write_zeroes(struct nvme_engine *e, const struct sqe *c)
{
    struct nvme_ns *ns = find_ns(e, c->nsid);
    if (!ns)
        return INVALID_NAMESPACE;
    uint64_t slba = (uint64_t)c->cdw11 << 32 | c->cdw10;
    uint64_t nlb = (c->cdw12 & 0xFFFF) + 1;
    if (out_of_range(ns, slba, nlb))
        return LBA_OUT_OF_RANGE;
    if (ns->read_only)
        return NAMESPACE_WRITE_PROTECTED;
    if (ns_write_zeroes(e, ns, slba << ns->lba_shift, nlb << ns->lba_shift)) {
        e->stats.media_errors++;
        return WRITE_FAULT;
    }
    return SUCCESS;
}

static uint16_t do_dsm(struct nvme_engine *e, const struct sqe *c)
{
    struct nvme_ns *ns = find_ns(e, c->nsid);
    if (!ns)
        return INVALID_NAMESPACE;
    uint32_t nr = (c->cdw10 & 0xFF) + 1;
    int nruns = map_prps(e, c->prp1, c->prp2, (uint64_t)nr * DSM_RANGE_SIZE);
    if (nruns < 0)
        return (uint16_t)-nruns;
    uint8_t raw[256 * DSM_RANGE_SIZE];
    uint64_t got = 0;
    for (int i = 0; i < nruns; i++) {
        memcpy(raw + got, e->runs[i].hva, e->runs[i].len);     /* a private copy */
        got += e->runs[i].len;
    }
    uint64_t slbas[256], nlbs[256];
    int nranges = 0;
    for (uint32_t i = 0; i < nr; i++) {
        uint32_t nlb;
        uint64_t slba;
        memcpy(&nlb, raw + i * DSM_RANGE_SIZE + 4, 4);
        memcpy(&slba, raw + i * DSM_RANGE_SIZE + 8, 8);
        if (nlb == 0)
            continue;
        if (out_of_range(ns, slba, nlb))
            return LBA_OUT_OF_RANGE;
        slbas[nranges] = slba;
        nlbs[nranges++] = nlb;
    }
    if (!(c->cdw11 & DSM_ATTR_DEALLOCATE))
        return SUCCESS;             /* integral read/write hints: advisory only */
    if (ns->read_only)
        return NAMESPACE_WRITE_PROTECTED;
    for (int i = 0; i < nranges; i++) {
        uint64_t off = slbas[i] << ns->lba_shift, len = nlbs[i] << ns->lba_shift;
        if (len && ns_fallocate(ns, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len) < 0)
            return WRITE_FAULT;
    }
    return SUCCESS;
}

static uint16_t execute(struct nvme_engine *e, const struct sqe *c)
{
    if (c->flags & 0x3)                          /* fused */
        return INVALID_FIELD;
    int psdt = (c->flags >> 6) & 0x3;
    switch (c->opcode) {
    case IO_READ:
    case IO_WRITE:
        if (psdt)
            return INVALID_FIELD;               /* SGLs are not supported */
        return do_rw(e, c, c->opcode == IO_WRITE);
    case IO_FLUSH:
        return do_flush(e, c);
    case IO_WRITE_ZEROES:
        return do_write_zeroes(e, c);
    case IO_DSM:
        if (psdt)
            return INVALID_FIELD;
        return do_dsm(e, c);
    default:
        return INVALID_OPCODE;
    }
}

uint16_t nvme_execute(struct nvme_engine *e, const uint8_t *raw)
{
    struct sqe c;
    e->run_base = 0;
    memcpy(&c, raw, sizeof(c));
    return execute(e, &c);
}

/* -- the data path ---------------------------------------------------------------------------- */

/* run the batch's I/O (together, through io_uring, when there are several)
 * and post its completions in fetch order; returns the count */
static int batch_flush(struct nvme_engine *e)
{
    int n = e->nbatch;
    if (!n)
        return 0;
    struct uring *u = e->uring;
    int ios = 0;
    unsigned ops = 0;
    for (int i = 0; i < n; i++)
        if (e->batch[i].status == NVME_PENDING_IO) {
            ios++;
            ops += e->batch[i].nruns;
        }
    if (u && ios >= 2 && ops <= u->entries) {
        unsigned queued = 0;
        for (int i = 0; i < n; i++) {
            struct nvme_pending *p = &e->batch[i];
            if (p->status != NVME_PENDING_IO || !direct_ok(e, p))
                continue;
            uint64_t off = p->offset;
            for (uint32_t k = 0; k < p->nruns; k++) {
                struct nvme_run_entry *r = &e->runs[p->run0 + k];
                e->results[p->run0 + k] = INT32_MIN;
                uring_prep(u, p->write, p->ns->fd, r->hva, (uint32_t)r->len, off, p->run0 + k);
                off += r->len;
                queued++;
            }
        }
        int64_t t_io = now_ns();
        if (queued && uring_run(u, queued, e->results) < 0)
            uring_free(e);           /* from now on synchronous; redo what is missing */
        e->rs.io_ns += (uint64_t)(now_ns() - t_io);
        e->batches++;
        e->batched_ios += (uint64_t)ios;
        for (int i = 0; i < n; i++) {
            struct nvme_pending *p = &e->batch[i];
            if (p->status != NVME_PENDING_IO)
                continue;
            int err = 0;
            if (!direct_ok(e, p)) {
                err = rw_sync(e, p);
            } else {
                uint64_t off = p->offset;
                for (uint32_t k = 0; k < p->nruns && !err; k++) {
                    struct nvme_run_entry *r = &e->runs[p->run0 + k];
                    if (e->results[p->run0 + k] != (int32_t)r->len)   /* short, failed, lost */
                        err = ns_io(e, p->ns, off, r->hva, r->len, p->write);
                    off += r->len;
                }
            }
            p->status = finish_rw(e, p, err);
        }
    } else {
        int64_t t_io = now_ns();
        for (int i = 0; i < n; i++) {
            struct nvme_pending *p = &e->batch[i];
            if (p->status == NVME_PENDING_IO)
                p->status = finish_rw(e, p, rw_sync(e, p));
        }
        e->rs.io_ns += (uint64_t)(now_ns() - t_io);
    }
    for (int i = 0; i < n; i++) {
        struct nvme_pending *p = &e->batch[i];
        struct nvme_cq *cq = &e->cqs[p->cqid];
        if (cq->reserved)
            cq->reserved--;
        post(e, p->cqid, p->sqid, p->cid, p->status, 0, p->sqhd);
    }
    e->nbatch = 0;
    e->run_base = 0;
    return n;
}


/* The command at ``sq``'s head, when its CQ has room for the completion
 * and the entry lies in guest RAM; the caller moves the head once it takes
 * it. A ring outside guest RAM stops its queue rather than spin. */
static int peek_sqe(struct nvme_engine *e, struct nvme_sq *sq, struct nvme_cq **cqp,
                    struct sqe *c)
{
    if (sq->head == sq->tail)
        return 0;
    struct nvme_cq *cq = &e->cqs[sq->cqid];
    if (!cq->used)
        return 0;
    if (cq_full_r(cq)) {
        refresh_cq(e, cq);
        if (cq_full_r(cq)) {
            cq->blocked = 1;
            return 0;
        }
    }
    cq->blocked = 0;
    if (gm_read(e, sq->gpa + (uint64_t)sq->head * SQE_SIZE, SQE_SIZE, c)) {
        e->ring_errors++;
        sq->head = sq->tail;
        return 0;
    }
    *cqp = cq;
    return 1;
}

/* Read every SQ's tail; a negative budget means "one queue-full of each". */
static int begin_pass(struct nvme_engine *e, int budget)
{
    if (budget < 0) {
        budget = 0;
        for (int i = 0; i < e->nsq; i++)
            budget += (int)e->sqs[e->sq_order[i]].size;
    }
    for (int i = 0; i < e->nsq; i++)
        refresh(e, &e->sqs[e->sq_order[i]]);
    return budget;
}

/* A read or write the fast path can run: PRPs (no SGL), no fused op. */
static int plain_rw(const struct sqe *c)
{
    return (c->opcode == IO_READ || c->opcode == IO_WRITE) && !(c->flags & 0x3)
           && !((c->flags >> 6) & 0x3);
}

int nvme_process(struct nvme_engine *e, int budget)
{
    budget = begin_pass(e, budget);
    int done = 0, progress = 1;
    while (progress && done < budget) {
        progress = 0;
        for (int i = 0; i < e->nsq; i++) {
            struct nvme_sq *sq = &e->sqs[e->sq_order[i]];
            struct nvme_cq *cq;
            struct sqe c;
            if (!peek_sqe(e, sq, &cq, &c))
                continue;
            sq->head = (sq->head + 1) % sq->size;
            int rw = plain_rw(&c);
            if (rw) {
                if (e->nbatch == NVME_BATCH ||
                    (e->run_base && e->run_base + e->max_runs > NVME_RING_OPS))
                    batch_flush(e);
                struct nvme_pending *p = &e->batch[e->nbatch];
                p->cqid = cq->qid;
                p->sqid = sq->qid;
                p->cid = c.cid;
                p->sqhd = (uint16_t)sq->head;
                p->status = prepare_rw(e, &c, c.opcode == IO_WRITE, p);
                if (p->status == NVME_PENDING_IO)
                    e->run_base += p->nruns;
                e->nbatch++;
                cq->reserved++;
            } else {
                batch_flush(e);               /* completions stay in fetch order */
                uint16_t status = execute(e, &c);
                post(e, cq->qid, sq->qid, c.cid, status, 0, -1);
            }
            done++;
            progress = 1;
            if (done >= budget)
                break;
        }
        if (!progress) {
            if (batch_flush(e))
                progress = 1;       /* posted: the guest may have rung meanwhile */
            /* pick up doorbells rung while we worked */
            for (int i = 0; i < e->nsq; i++) {
                struct nvme_sq *sq = &e->sqs[e->sq_order[i]];
                uint32_t old = sq->tail;
                refresh(e, sq);
                if (sq->tail != old)
                    progress = 1;
            }
        }
    }
    batch_flush(e);
    nvme_flush_interrupts(e);
    return done;
}

/* -- the pipeline (nvme_run) ------------------------------------------------------------------ */

/* reap io_uring completions into e->results and the FIFO's outstanding
 * counts; with wait, block until at least one is there */
static void pipe_reap(struct nvme_engine *e, int wait)
{
    struct uring *u = e->uring;
    if (!u)
        return;
    if (wait && e->inflight_ops &&
        *u->cq_head == __atomic_load_n(u->cq_tail, __ATOMIC_ACQUIRE)) {
        int64_t t = now_ns();
        uring_wait(u);
        e->rs.io_ns += (uint64_t)(now_ns() - t);
    }
    unsigned head = *u->cq_head;
    unsigned tail = __atomic_load_n(u->cq_tail, __ATOMIC_ACQUIRE);
    while (head != tail) {
        struct io_uring_cqe *c = &u->cqes[head & *u->cq_mask];
        uint64_t tag = c->user_data;
        if (tag >= e->fifo_base && tag < e->pool_runs) {
            e->results[tag] = c->res;
            struct nvme_pending *p = &e->fifo[(tag - e->fifo_base) / e->max_runs];
            if (p->outstanding)
                p->outstanding--;
        }
        head++;
        if (e->inflight_ops)
            e->inflight_ops--;
    }
    __atomic_store_n(u->cq_head, head, __ATOMIC_RELEASE);
}

/* the ring failed: wait for what is in flight, give the ring up, and let
 * pipe_post redo synchronously every operation without a full result */
static void pipe_fail(struct nvme_engine *e)
{
    for (int tries = 0; e->inflight_ops && tries < 1000; tries++)
        pipe_reap(e, 1);
    uring_free(e);
    e->queued_ops = e->inflight_ops = 0;
    for (int i = 0; i < NVME_FIFO; i++)
        e->fifo[i].outstanding = 0;
}

static void pipe_submit(struct nvme_engine *e)
{
    struct uring *u = e->uring;
    while (u && e->queued_ops) {
        int r = uring_submit(u, e->queued_ops);
        if (r < 0)
            errno = -r;
        if (r > 0) {
            e->queued_ops -= (uint32_t)r;
            e->inflight_ops += (uint32_t)r;
        } else if (r < 0 && errno == EINTR) {
            continue;
        } else if (r < 0 && (errno == EAGAIN || errno == EBUSY) && e->inflight_ops) {
            pipe_reap(e, 1);
        } else {
            pipe_fail(e);
            return;
        }
    }
}

/* post, in fetch order, every command at the FIFO's head whose I/O is done */
static int pipe_post(struct nvme_engine *e)
{
    int n = 0;
    while (e->fifo_count) {
        struct nvme_pending *p = &e->fifo[e->fifo_head];
        if (p->status == NVME_PENDING_IO) {
            if (p->outstanding)
                break;
            int err = 0;
            uint64_t off = p->offset;
            for (uint32_t k = 0; k < p->nruns && !err; k++) {
                struct nvme_run_entry *r = &e->runs[p->run0 + k];
                if (e->results[p->run0 + k] != (int32_t)r->len)     /* short, failed, lost */
                    err = ns_io(e, p->ns, off, r->hva, r->len, p->write);
                off += r->len;
            }
            p->status = finish_rw(e, p, err);
        }
        struct nvme_cq *cq = &e->cqs[p->cqid];
        if (cq->reserved)
            cq->reserved--;
        post(e, p->cqid, p->sqid, p->cid, p->status, 0, p->sqhd);
        e->fifo_head = (e->fifo_head + 1) % NVME_FIFO;
        e->fifo_count--;
        n++;
    }
    return n;
}

int nvme_inflight(struct nvme_engine *e)
{
    return (int)e->fifo_count;
}

void nvme_drain(struct nvme_engine *e)
{
    pipe_submit(e);
    while (e->fifo_count) {
        if (e->uring && e->inflight_ops)
            pipe_reap(e, 1);
        else
            for (int i = 0; i < NVME_FIFO; i++)      /* nothing can arrive: redo */
                e->fifo[i].outstanding = 0;
        pipe_post(e);
    }
}

int nvme_pump(struct nvme_engine *e, int budget)
{
    budget = begin_pass(e, budget);
    int fetched = 0, progress = 1, full = 0;
    while (progress && !full && fetched < budget) {
        progress = 0;
        for (int i = 0; i < e->nsq && !full; i++) {
            struct nvme_sq *sq = &e->sqs[e->sq_order[i]];
            struct nvme_cq *cq;
            struct sqe c;
            if (!peek_sqe(e, sq, &cq, &c))
                continue;
            int rw = plain_rw(&c);
            if (rw) {
                struct uring *u = e->uring;
                if (e->fifo_count == NVME_FIFO ||
                    (u && e->queued_ops + e->inflight_ops + e->max_runs > u->entries)) {
                    full = 1;          /* fetched later, when some of the FIFO is posted */
                    break;
                }
                sq->head = (sq->head + 1) % sq->size;
                uint32_t slot = (e->fifo_head + e->fifo_count) % NVME_FIFO;
                struct nvme_pending *p = &e->fifo[slot];
                p->cqid = cq->qid;
                p->sqid = sq->qid;
                p->cid = c.cid;
                p->sqhd = (uint16_t)sq->head;
                p->outstanding = 0;
                e->run_base = e->fifo_base + slot * e->max_runs;
                p->status = prepare_rw(e, &c, c.opcode == IO_WRITE, p);
                e->run_base = 0;
                if (p->status == NVME_PENDING_IO) {
                    if (u && direct_ok(e, p)) {
                        uint64_t off = p->offset;
                        for (uint32_t k = 0; k < p->nruns; k++) {
                            struct nvme_run_entry *r = &e->runs[p->run0 + k];
                            e->results[p->run0 + k] = INT32_MIN;
                            uring_prep(u, p->write, p->ns->fd, r->hva, (uint32_t)r->len, off,
                                       p->run0 + k);
                            off += r->len;
                            e->queued_ops++;
                            p->outstanding++;
                        }
                    } else {
                        /* the bounce buffer or no ring: synchronously, now */
                        p->status = finish_rw(e, p, rw_sync(e, p));
                    }
                }
                e->fifo_count++;
                cq->reserved++;
            } else {
                sq->head = (sq->head + 1) % sq->size;
                nvme_drain(e);                 /* completions stay in fetch order */
                uint16_t status = execute(e, &c);
                post(e, cq->qid, sq->qid, c.cid, status, 0, -1);
            }
            fetched++;
            progress = 1;
            if (fetched >= budget)
                break;
        }
        if (!progress && !full) {
            for (int i = 0; i < e->nsq; i++) {      /* doorbells rung meanwhile */
                struct nvme_sq *sq = &e->sqs[e->sq_order[i]];
                uint32_t old = sq->tail;
                refresh(e, sq);
                if (sq->tail != old)
                    progress = 1;
            }
        }
    }
    pipe_submit(e);
    pipe_reap(e, 0);
    int posted = pipe_post(e);
    if (posted || fetched)
        nvme_flush_interrupts(e);
    e->rs.commands += (uint64_t)fetched;
    if ((uint64_t)fetched > e->rs.max_pass)
        e->rs.max_pass = (uint64_t)fetched;
    return fetched + posted;
}

#define drain hv_drain_fd

/* poll kick + control; returns 1 if the control fd wants Python, 0 else;
 * *kicked: the kick fd fired */
static int wait_fds(struct nvme_engine *e, int timeout_ms, int *err, int *kicked)
{
    struct pollfd p[2] = {{e->kick_fd, POLLIN, 0}, {e->ctrl_fd, POLLIN, 0}};
    int n = poll(p, 2, timeout_ms);
    if (n < 0) {
        if (errno != EINTR)
            *err = -errno;
        return 0;
    }
    if (p[0].revents & POLLIN) {
        drain(e->kick_fd);
        if (kicked)
            *kicked = 1;
    }
    return (p[1].revents & (POLLIN | POLLHUP | POLLERR | POLLNVAL)) != 0;
}

#define PREEMPTED_NS 50000     /* a pass longer than this: the CPU went elsewhere */
#define POLL_MIN_NS 10000      /* a window growing from 0 starts here */
#define CONTENTION_CHECK_NS 1000000   /* while polling, look at the CPUs this often */

/* More runnable threads than CPUs: a core we spin on is a core the vCPU
 * or another program waits for, so polling costs more than the exits it
 * saves (native/common/hostcpu.c). */
static int cpus_contended(struct nvme_engine *e)
{
    return !e->poll_always && hv_cpus_contended(e->loadavg_fd, e->ncpus);
}

static void window_set(struct nvme_engine *e, int64_t w)
{
    struct nvme_run_stats *s = &e->rs;
    if (w > e->window)
        s->grows++;
    else if (w < e->window)
        s->shrinks++;
    e->window = w;
    s->window_ns = w;
    if (w < s->window_min_ns)
        s->window_min_ns = w;
    if (w > s->window_max_ns)
        s->window_max_ns = w;
}

int nvme_run(struct nvme_engine *e, int64_t poll_ns)
{
    struct nvme_run_stats *s = &e->rs;
    if (poll_ns < 0)
        poll_ns = 0;
    /* The poll window adapts as KVM's halt polling does, judged by what
     * the guest did: after a sleep that a doorbell ended, if the doorbell
     * came within poll_ns of the last command, a window that long would
     * have caught it without the guest's exit, so the window grows; a
     * sleep longer than poll_ns (or a window that ran out for nothing)
     * shrinks it, and so does losing the CPU while polling (on a host with
     * fewer cores than busy threads the spinning takes the core the vCPU
     * needs to ring us). */
    if (!e->window_set || e->window > poll_ns) {
        e->window = poll_ns;
        e->window_set = 1;
        s->window_ns = s->window_min_ns = s->window_max_ns = poll_ns;
    }
    int64_t last_work = now_ns(), prev = last_work, checked = last_work;
    int err = 0;
    unsigned spins = 0;
    int polled = 0;           /* a window is running since last_work */
    for (;;) {
        int done = nvme_pump(e, -1);
        int64_t t = now_ns();
        s->passes++;
        if (done) {
            s->work_passes++;
            s->work_ns += (uint64_t)(t - prev);
            if (polled) {
                s->poll_hits++;
                s->poll_ns += (uint64_t)(prev - last_work);
            }
            nvme_publish_counters(e);
            last_work = prev = t;
            polled = 1;
        }
        /* the control socket and the kick: every pass after work, every
         * 64th while spinning idle (a syscall costs more than a pass) */
        if (done || (++spins & 63) == 0) {
            if (wait_fds(e, 0, &err, NULL) || err) {
                /* Python takes over with nothing in flight */
                nvme_drain(e);
                nvme_flush_interrupts(e);
                nvme_publish_counters(e);
                return err ? err : 1;
            }
        }
        if (done)
            continue;
        /* a pass that took this long means another thread wanted our core
         * (often the vCPU about to ring us), and spinning on would keep it
         * waiting for a scheduler tick: sleep on the kick instead */
        int preempted = t - prev > PREEMPTED_NS;
        prev = t;
        if (e->window && t - checked > CONTENTION_CHECK_NS) {
            checked = t;
            if (cpus_contended(e)) {
                s->contended++;
                window_set(e, 0);
            }
        }
        if (nvme_inflight(e)) {
            /* I/O in flight and no new command: block on the ring rather
             * than spin, leaving the CPU to the vCPU (its next commands
             * mostly follow our completions, and a command it adds
             * meanwhile is fetched at the next completion); the window
             * starts again after it */
            if (polled)
                s->poll_ns += (uint64_t)(t - last_work);
            pipe_reap(e, 1);
            last_work = prev = now_ns();
            polled = 0;
            continue;
        }
        if (t - last_work < e->window && !preempted) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
            continue;
        }
        s->poll_ns += (uint64_t)(t - last_work);
        if (preempted) {
            s->preempted++;
            window_set(e, e->window / 2);
        } else if (e->window) {
            s->poll_expired++;
        }
        /* going idle: ask for a kick on the next doorbell, then look once
         * more so that a doorbell rung in between is not missed */
        nvme_update_event_indexes(e);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (nvme_has_work(e)) {
            s->rearm_saves++;
            continue;
        }
        int kicked = 0;
        int64_t slept = now_ns();
        int ctl = wait_fds(e, 1000, &err, &kicked);
        int64_t woke = now_ns();
        s->sleep_ns += (uint64_t)(woke - slept);
        if (ctl)
            return 1;
        if (err)
            return err;
        if (kicked) {
            s->kicks++;
            if (woke - last_work <= poll_ns && !preempted && poll_ns && !cpus_contended(e)) {
                int64_t w = e->window * 2;
                if (w < POLL_MIN_NS)
                    w = POLL_MIN_NS;
                window_set(e, w < poll_ns ? w : poll_ns);
            } else if (woke - last_work > poll_ns) {
                window_set(e, e->window / 2);
            }
        } else {
            s->timeouts++;
            window_set(e, e->window / 2);
        }
        last_work = prev = now_ns();
        polled = 0;
    }
}
