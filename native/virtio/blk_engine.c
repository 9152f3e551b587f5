/* virtio-blk's request queue in C: see blk_engine.h.
 *
 * Ring words the driver reads while we write them (used elements, the used
 * index, flags, avail_event) are single aligned stores, the used index
 * after a release fence; the driver's words are read once each into
 * locals, so a guest rewriting a descriptor while we walk it changes
 * nothing we already checked.
 */
#define _GNU_SOURCE
#include "blk_engine.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/prctl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "hostcpu.h"
#include "uring.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the virtio-blk engine assumes a little-endian host"
#endif

/* the split ring (spec.py) */
#define DESC_SIZE 16
#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define AVAIL_F_NO_INTERRUPT 1
#define USED_F_NO_NOTIFY 1
#define USED_ELEM_SIZE 8

/* requests (blk.py) */
#define SECTOR 512ull
#define HEADER 16
#define SEGMENT 16
#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define T_DISCARD 11
#define T_WRITE_ZEROES 13
#define WRITE_ZEROES_UNMAP 1u
#define ID_BYTES 20

#define POLL_MIN_NS 10000           /* a window growing from 0 starts here */
#define CONTENTION_CHECK_NS 1000000

static inline uint16_t ld16(const uint8_t *p)
{
    return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE);
}

static inline void st16(uint8_t *p, uint16_t v)
{
    __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE);
}

static inline int need_event(uint16_t event, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old_idx);
}

/* Guest pages the engine wrote through its mapping: KVM's dirty log sees
 * only the guest's own writes, so a diff snapshot asks the engine. */
static void mark(struct vblk_engine *e, const uint8_t *p, uint64_t len)
{
    if (!len)
        return;
    for (int i = 0; i < e->nregions; i++) {
        const struct hv_region *r = &e->regions[i];
        if (p < r->hva || p - r->hva >= (ptrdiff_t)r->size || !e->dirty[i])
            continue;
        uint64_t first = (uint64_t)(p - r->hva) / VBLK_PAGE;
        uint64_t last = ((uint64_t)(p - r->hva) + len - 1) / VBLK_PAGE;
        uint64_t pages = (r->size + VBLK_PAGE - 1) / VBLK_PAGE;
        for (uint64_t k = first; k <= last && k < pages; k++)
            e->dirty[i][k / 8] |= (uint8_t)(1u << (k % 8));
        return;
    }
}

/* -- set-up --------------------------------------------------------------------- */

int vblk_init(struct vblk_engine *e, int fd, uint64_t size, int read_only, uint32_t align)
{
    memset(e, 0, sizeof(*e));
    if (!align || (align & (align - 1)) || align > 4096)
        return -EINVAL;
    e->disk = (struct hv_file){fd, size, read_only, align};
    e->kick_fd = e->stop_fd = e->irq_fd = -1;
    e->max_segments = 32;
    e->max_discard_sectors = 1u << 22;
    e->loadavg_fd = open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
    e->ncpus = sysconf(_SC_NPROCESSORS_ONLN);
    e->window = -1;
    e->slots = calloc(VBLK_SLOTS, sizeof(*e->slots));
    for (int i = 0; i < VBLK_SLOTS; i++)
        e->free_slots[i] = VBLK_SLOTS - 1 - i;
    e->nfree = VBLK_SLOTS;
    if (!e->slots || hv_io_buffers(&e->bounce, &e->zeros)) {
        vblk_free(e);
        return -ENOMEM;
    }
    return 0;
}

void vblk_free(struct vblk_engine *e)
{
    uring_close(e->uring);
    e->uring = NULL;
    hv_io_buffers_free(e->bounce, e->zeros);
    e->bounce = e->zeros = NULL;
    for (int i = 0; i < e->nregions; i++) {
        free(e->dirty[i]);
        e->dirty[i] = NULL;
    }
    free(e->slots);
    free(e->rd);
    free(e->wr);
    e->slots = NULL;
    e->rd = e->wr = NULL;
    if (e->loadavg_fd >= 0)
        close(e->loadavg_fd);
    e->loadavg_fd = -1;
}

int vblk_enable_uring(struct vblk_engine *e)
{
    return uring_open(&e->uring, VBLK_RING_OPS);
}

int vblk_add_region(struct vblk_engine *e, uint64_t gpa, uint64_t size, uint8_t *hva)
{
    int r = hv_gm_add(e->regions, &e->nregions, VBLK_MAX_REGIONS, gpa, size, hva);
    if (r)
        return r;
    e->dirty[e->nregions - 1] = calloc((size + 8 * VBLK_PAGE - 1) / (8 * VBLK_PAGE), 1);
    return e->dirty[e->nregions - 1] ? 0 : -ENOMEM;
}

int vblk_set_queue(struct vblk_engine *e, uint32_t size, uint64_t desc, uint64_t avail,
                   uint64_t used, uint16_t last_avail, uint16_t used_idx, uint16_t signalled,
                   int event_idx, int indirect)
{
    e->ready = 0;
    if (!size || size > 32768 || (size & (size - 1)) || desc % 16 || avail % 2 || used % 4)
        return -EINVAL;
    e->desc = hv_gm_ptr(e->regions, e->nregions, desc, (uint64_t)DESC_SIZE * size);
    e->avail = hv_gm_ptr(e->regions, e->nregions, avail, 6 + 2ull * size);
    e->used = hv_gm_ptr(e->regions, e->nregions, used, 6 + (uint64_t)USED_ELEM_SIZE * size);
    if (!e->desc || !e->avail || !e->used)
        return -EINVAL;
    mark(e, e->used, 6 + (uint64_t)USED_ELEM_SIZE * size);     /* flags, idx, ring, avail_event */
    /* a chain has at most size descriptors, then one indirect table; each
     * buffer lies in at most nregions regions */
    size_t cap = ((size_t)size + VBLK_MAX_INDIRECT) * (size_t)(e->nregions ? e->nregions : 1);
    if (cap > e->seg_cap) {
        struct vblk_seg *rd = realloc(e->rd, cap * sizeof(*rd));
        if (rd)
            e->rd = rd;
        struct vblk_seg *wr = realloc(e->wr, cap * sizeof(*wr));
        if (wr)
            e->wr = wr;
        if (!rd || !wr)
            return -ENOMEM;
        e->seg_cap = cap;
    }
    e->size = size;
    e->last_avail = last_avail;
    e->used_idx = used_idx;
    e->signalled = signalled;
    e->event_idx = event_idx;
    e->indirect = indirect;
    e->broken = 0;
    e->ready = 1;
    return 0;
}

/* -- the ring ------------------------------------------------------------------------ */

/* chains the driver made available and we have not taken; -1 (and broken)
 * if its index is more than a queue ahead */
static int pending(struct vblk_engine *e)
{
    if (!e->ready || e->broken)
        return 0;
    uint16_t idx = ld16(e->avail + 2);
    uint16_t n = (uint16_t)(idx - e->last_avail);
    if (n > e->size) {
        e->broken = 1;
        return -1;
    }
    return n;
}

static void push(struct vblk_engine *e, uint16_t head, uint64_t len)
{
    uint8_t *elem = e->used + 4 + (uint64_t)USED_ELEM_SIZE * (e->used_idx % e->size);
    uint64_t v = (uint64_t)head | (uint64_t)(len > 0xFFFFFFFFull ? 0xFFFFFFFFull : len) << 32;
    memcpy(elem, &v, 8);
    e->used_idx++;
    st16(e->used + 2, e->used_idx);
}

int vblk_needs_interrupt(struct vblk_engine *e)
{
    if (!e->ready)
        return 0;
    uint16_t new_idx = e->used_idx, old = e->signalled;
    e->signalled = new_idx;
    if (new_idx == old)
        return 0;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);     /* the used index before used_event */
    if (e->event_idx)
        return need_event(ld16(e->avail + 4 + 2ull * e->size), new_idx, old);
    return !(ld16(e->avail) & AVAIL_F_NO_INTERRUPT);
}

static void interrupt(struct vblk_engine *e)
{
    if (!vblk_needs_interrupt(e))
        return;
    e->st.interrupts++;
    if (e->irq_fd >= 0) {
        uint64_t one = 1;
        ssize_t r = write(e->irq_fd, &one, sizeof(one));
        (void)r;
    }
}

/* polling: the driver need not notify (with EVENT_IDX, avail_event simply
 * stays behind, so the driver's index never crosses it) */
static void notifications_off(struct vblk_engine *e)
{
    if (e->ready && !e->event_idx)
        st16(e->used, USED_F_NO_NOTIFY);
    e->notify_off = 1;
}

/* going to sleep: notify on the next addition; returns whether work came
 * in meanwhile (then do not sleep) */
static int notifications_on(struct vblk_engine *e)
{
    if (!e->ready || e->broken)
        return 0;
    if (e->event_idx)
        st16(e->used + 4 + (uint64_t)USED_ELEM_SIZE * e->size, e->last_avail);
    else
        st16(e->used, 0);
    e->notify_off = 0;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return pending(e) != 0;
}

/* append [addr, addr+len) as segments, one per region it crosses
 * (queue.py guest_views); -1 if any byte is outside RAM */
static int add_buffer(struct vblk_engine *e, struct vblk_seg *out, size_t *n, uint64_t addr,
                      uint64_t len)
{
    uint64_t cur = addr, left = len;
    while (left) {
        int i = hv_gm_index(e->regions, e->nregions, cur, 1);
        if (i < 0 || *n >= e->seg_cap)
            return -1;
        struct hv_region *r = &e->regions[i];
        uint64_t k = r->size - (cur - r->gpa);
        if (k > left)
            k = left;
        out[(*n)++] = (struct vblk_seg){r->hva + (cur - r->gpa), k};
        if (cur + k < cur)
            return -1;
        cur += k;
        left -= k;
    }
    return 0;
}

/* walk the chain at ``head`` into e->rd / e->wr (queue.py _walk); -1 if it
 * is malformed */
static int walk(struct vblk_engine *e, uint16_t head, size_t *nrd, size_t *nwr)
{
    const uint8_t *table = e->desc;
    uint32_t limit = e->size, idx = head, seen = 0;
    int nested = 0;
    *nrd = *nwr = 0;
    for (;;) {
        if (idx >= limit)
            return -1;
        if (++seen > limit)
            return -1;                  /* a loop, or longer than its table */
        uint64_t addr;
        uint32_t len;
        uint16_t flags, next;
        const uint8_t *d = table + (uint64_t)DESC_SIZE * idx;
        memcpy(&addr, d, 8);
        memcpy(&len, d + 8, 4);
        memcpy(&flags, d + 12, 2);
        memcpy(&next, d + 14, 2);
        if (flags & DESC_F_INDIRECT) {
            if (!e->indirect || nested || (flags & DESC_F_NEXT))
                return -1;
            if (len == 0 || len % DESC_SIZE || len / DESC_SIZE > VBLK_MAX_INDIRECT)
                return -1;
            table = hv_gm_ptr(e->regions, e->nregions, addr, len);
            if (!table)
                return -1;
            nested = 1;
            limit = len / DESC_SIZE;
            idx = 0;
            seen = 0;
            continue;
        }
        if (len) {
            if (flags & DESC_F_WRITE) {
                if (add_buffer(e, e->wr, nwr, addr, len))
                    return -1;
            } else {
                if (*nwr)
                    return -1;          /* readable after writable */
                if (add_buffer(e, e->rd, nrd, addr, len))
                    return -1;
            }
        }
        if (!(flags & DESC_F_NEXT))
            return 0;
        idx = next;
    }
}

/* -- requests (blk.py _serve / _execute) ------------------------------------------- */

/* a walk over [skip, skip+len) of a chain's segments, one piece at a time */
struct seg_cursor {
    const struct vblk_seg *s;
    size_t ns, i;
    uint64_t skip, len;
};

/* the next piece (its host address and length), 0 at the end */
static int seg_next(struct seg_cursor *c, uint8_t **p, uint64_t *k)
{
    for (; c->i < c->ns && c->len; c->i++) {
        const struct vblk_seg *s = &c->s[c->i];
        if (c->skip >= s->len) {
            c->skip -= s->len;
            continue;
        }
        *p = s->hva + c->skip;
        *k = s->len - c->skip < c->len ? s->len - c->skip : c->len;
        c->len -= *k;
        c->skip = 0;
        c->i++;
        return 1;
    }
    return 0;
}

/* copy n bytes from the segments, starting ``skip`` bytes in */
static void gather(const struct vblk_seg *s, size_t ns, uint64_t skip, uint8_t *out, uint64_t n)
{
    struct seg_cursor c = {s, ns, 0, skip, n};
    uint8_t *p;
    uint64_t k;
    while (seg_next(&c, &p, &k)) {
        memcpy(out, p, k);
        out += k;
    }
}

static uint64_t total(const struct vblk_seg *s, size_t n)
{
    uint64_t t = 0;
    for (size_t i = 0; i < n; i++)
        t += s[i].len;
    return t;
}

/* [sector, +length) inside the disk and whole sectors? (blk.py _range) */
static int range_ok(struct vblk_engine *e, uint64_t sector, uint64_t length)
{
    if (length % SECTOR)
        return 0;
    if (sector > e->disk.size / SECTOR)
        return 0;
    uint64_t off = sector * SECTOR;
    return length <= e->disk.size - off;
}

/* the data part of a request: the segments after ``skip`` bytes, for
 * ``len`` bytes, into iov (up to max); how many, or max + 1 if more */
static int data_iov(const struct vblk_seg *s, size_t ns, uint64_t skip, uint64_t len,
                    struct iovec *iov, int max)
{
    struct seg_cursor c = {s, ns, 0, skip, len};
    uint8_t *p;
    uint64_t k;
    int n = 0;
    while (seg_next(&c, &p, &k)) {
        if (n == max)
            return max + 1;
        iov[n++] = (struct iovec){p, k};
    }
    return n;
}

/* one read or write, synchronously, segment by segment; 0 or -errno */
static int rw_sync(struct vblk_engine *e, const struct vblk_seg *s, size_t ns, uint64_t skip,
                   uint64_t len, uint64_t off, int write)
{
    struct seg_cursor c = {s, ns, 0, skip, len};
    uint8_t *p;
    uint64_t k;
    while (seg_next(&c, &p, &k)) {
        if (!write)
            mark(e, p, k);
        int r = hv_file_io(&e->disk, e->bounce, off, p, k, write);
        if (r)
            return r;
        off += k;
    }
    return 0;
}

static int iov_sync(struct vblk_engine *e, const struct vblk_slot *sl)
{
    uint64_t off = sl->offset;
    for (int i = 0; i < sl->niov; i++) {
        int r = hv_file_io(&e->disk, e->bounce, off, sl->iov[i].iov_base, sl->iov[i].iov_len,
                           sl->write);
        if (r)
            return r;
        off += sl->iov[i].iov_len;
    }
    return 0;
}

static void count(struct vblk_engine *e, int status)
{
    if (status == VBLK_S_OK)
        e->st.ok++;
    else if (status == VBLK_S_IOERR)
        e->st.ioerr++;
    else
        e->st.unsupp++;
}

/* discard / write-zeroes: the segments are all checked before any runs */
static int segments(struct vblk_engine *e, uint32_t type, size_t nrd, uint64_t rlen)
{
    if (e->disk.read_only)
        return VBLK_S_IOERR;
    uint64_t rest = rlen - HEADER;
    uint64_t n = rest / SEGMENT;
    if (rest % SEGMENT || n < 1 || n > e->max_segments)
        return VBLK_S_IOERR;
    for (uint64_t i = 0; i < n; i++) {
        uint8_t seg[SEGMENT];
        gather(e->rd, nrd, HEADER + i * SEGMENT, seg, SEGMENT);
        uint64_t sector;
        uint32_t nsect, flags;
        memcpy(&sector, seg, 8);
        memcpy(&nsect, seg + 8, 4);
        memcpy(&flags, seg + 12, 4);
        if (nsect > e->max_discard_sectors)
            return VBLK_S_IOERR;
        if (type == T_DISCARD && flags)
            return VBLK_S_UNSUPP;
        if (flags & ~WRITE_ZEROES_UNMAP)
            return VBLK_S_UNSUPP;
        if (!range_ok(e, sector, (uint64_t)nsect * SECTOR))
            return VBLK_S_IOERR;
    }
    for (uint64_t i = 0; i < n; i++) {
        uint8_t seg[SEGMENT];
        gather(e->rd, nrd, HEADER + i * SEGMENT, seg, SEGMENT);
        uint64_t sector;
        uint32_t nsect;
        memcpy(&sector, seg, 8);
        memcpy(&nsect, seg + 8, 4);
        uint64_t off = sector * SECTOR, len = (uint64_t)nsect * SECTOR;
        int r = type == T_DISCARD ? hv_discard(&e->disk, off, len)
                                  : hv_write_zeroes(&e->disk, e->bounce, e->zeros, off, len);
        if (r)
            return VBLK_S_IOERR;
    }
    return VBLK_S_OK;
}

static void finish(struct vblk_engine *e, uint16_t head, uint8_t *status_byte, int status,
                   uint64_t used_len)
{
    *status_byte = (uint8_t)status;
    mark(e, status_byte, 1);
    count(e, status);
    push(e, head, used_len);
}

static void drain_io(struct vblk_engine *e);

/* Take the chain at ``head``: answer it now, or (async, a plain aligned
 * read or write with a free slot and a ring) start its I/O. */
static void request(struct vblk_engine *e, uint16_t head, int async)
{
    size_t nrd, nwr;
    if (walk(e, head, &nrd, &nwr)) {
        e->st.chain_errors++;
        push(e, head, 0);
        return;
    }
    uint64_t rlen = total(e->rd, nrd), wlen = total(e->wr, nwr);
    if (wlen < 1) {                     /* no status byte: nowhere to answer */
        e->st.chain_errors++;
        push(e, head, 0);
        return;
    }
    struct vblk_seg *last = &e->wr[nwr - 1];
    uint8_t *status_byte = last->hva + last->len - 1;
    uint64_t out_len = wlen - 1;        /* the writable data before the status byte */
    if (rlen < HEADER) {
        finish(e, head, status_byte, VBLK_S_IOERR, wlen);
        return;
    }
    uint8_t hdr[HEADER];
    gather(e->rd, nrd, 0, hdr, HEADER);
    uint32_t type;
    uint64_t sector;
    memcpy(&type, hdr, 4);
    memcpy(&sector, hdr + 8, 8);
    int write = type == T_OUT;
    if (type == T_IN || type == T_OUT) {
        uint64_t len = write ? rlen - HEADER : out_len;
        if ((write && e->disk.read_only) || !range_ok(e, sector, len)) {
            finish(e, head, status_byte, VBLK_S_IOERR, wlen);
            return;
        }
        const struct vblk_seg *s = write ? e->rd : e->wr;
        size_t ns = write ? nrd : nwr;
        uint64_t skip = write ? HEADER : 0;
        uint64_t off = sector * SECTOR;
        if (async && e->uring && e->nfree && len) {
            struct vblk_slot *sl = &e->slots[e->free_slots[e->nfree - 1]];
            int niov = data_iov(s, ns, skip, len, sl->iov, VBLK_SLOT_IOV);
            int direct = niov <= VBLK_SLOT_IOV;
            uint64_t o = off;
            for (int i = 0; direct && i < niov; i++) {
                direct = hv_file_direct_ok(&e->disk, o, sl->iov[i].iov_base,
                                           sl->iov[i].iov_len);
                o += sl->iov[i].iov_len;
            }
            if (direct) {
                int id = e->free_slots[--e->nfree];
                sl->used = 1;
                sl->head = head;
                sl->write = (uint8_t)write;
                sl->status = status_byte;
                sl->used_len = (uint32_t)(wlen > 0xFFFFFFFFull ? 0xFFFFFFFFull : wlen);
                sl->offset = off;
                sl->length = len;
                sl->niov = niov;
                uring_prepv(e->uring, write, e->disk.fd, sl->iov, (uint32_t)niov, off,
                            (uint64_t)id);
                e->queued++;
                e->rs.uring_ios++;
                return;
            }
        }
        e->rs.sync_ios++;
        int r = rw_sync(e, s, ns, skip, len, off, write);
        if (!r) {
            if (write)
                e->st.bytes_written += len;
            else
                e->st.bytes_read += len;
        }
        finish(e, head, status_byte, r ? VBLK_S_IOERR : VBLK_S_OK, wlen);
        return;
    }
    /* everything else waits for the reads and writes before it */
    drain_io(e);
    int status;
    if (type == T_FLUSH) {
        status = hv_file_flush(&e->disk) ? VBLK_S_IOERR : VBLK_S_OK;
    } else if (type == T_GET_ID) {
        uint64_t n = out_len < ID_BYTES ? out_len : ID_BYTES;
        struct iovec iov[ID_BYTES];
        int niov = data_iov(e->wr, nwr, 0, n, iov, ID_BYTES);
        const uint8_t *src = e->serial;
        for (int i = 0; i < niov && i < ID_BYTES; i++) {
            memcpy(iov[i].iov_base, src, iov[i].iov_len);
            mark(e, iov[i].iov_base, iov[i].iov_len);
            src += iov[i].iov_len;
        }
        status = VBLK_S_OK;
    } else if (type == T_DISCARD || type == T_WRITE_ZEROES) {
        status = segments(e, type, nrd, rlen);
    } else {
        status = VBLK_S_UNSUPP;
    }
    finish(e, head, status_byte, status, wlen);
}

/* take the next available chain: 1 taken, 0 none, -1 the ring broke */
static int take(struct vblk_engine *e, int async)
{
    int n = pending(e);
    if (n <= 0)
        return n;
    uint16_t head;
    memcpy(&head, e->avail + 4 + 2ull * (e->last_avail % e->size), 2);
    e->last_avail++;
    if (head >= e->size) {
        e->broken = 1;
        return -1;
    }
    request(e, head, async);
    return 1;
}

int vblk_process(struct vblk_engine *e)
{
    int n = 0;
    if (!e->ready || e->broken)
        return e->broken ? -1 : 0;
    do {
        notifications_off(e);
        int r;
        while ((r = take(e, 0)) > 0)
            n++;
        if (r < 0)
            return -1;
    } while (notifications_on(e));
    if (e->broken)
        return -1;
    interrupt(e);
    return n;
}

/* -- I/O in flight --------------------------------------------------------------------- */

static void complete(struct vblk_engine *e, int id, int32_t res)
{
    struct vblk_slot *sl = &e->slots[id];
    int err = 0;
    for (int i = 0; !sl->write && i < sl->niov; i++)
        mark(e, sl->iov[i].iov_base, sl->iov[i].iov_len);
    if (res < 0 || (uint64_t)res != sl->length)      /* short, failed: redo it plainly */
        err = iov_sync(e, sl);
    if (!err) {
        if (sl->write)
            e->st.bytes_written += sl->length;
        else
            e->st.bytes_read += sl->length;
    }
    finish(e, sl->head, sl->status, err ? VBLK_S_IOERR : VBLK_S_OK, sl->used_len);
    sl->used = 0;
    e->free_slots[e->nfree++] = id;
    e->inflight--;
}

/* the ring failed: what it did not take is done synchronously, and the
 * engine goes on without it once nothing is in flight */
static void submit(struct vblk_engine *e)
{
    struct uring *u = e->uring;
    while (u && e->queued) {
        int r = uring_submit(u, (unsigned)e->queued);
        if (r > 0) {
            e->queued -= r;
            e->inflight += r;
        } else if (r == -EINTR || ((r == -EAGAIN || r == -EBUSY) && e->inflight)) {
            if (r != -EINTR)
                uring_wait(u);
            return;
        } else {
            /* the queued SQEs are the last ones prepared: find their slots
             * (used, not in flight) and run them here */
            unsigned tail = *u->sq_tail, head = *u->sq_head;
            for (unsigned k = head; k != tail; k++) {
                struct io_uring_sqe *sqe = &u->sqes[u->sq_array[k & *u->sq_mask]];
                int id = (int)sqe->user_data;
                e->inflight++;
                complete(e, id, -EIO);
            }
            *u->sq_tail = head;
            e->queued = 0;
            return;
        }
    }
}

static int reap(struct vblk_engine *e)
{
    struct uring *u = e->uring;
    if (!u)
        return 0;
    int n = 0;
    unsigned head = *u->cq_head;
    unsigned tail = __atomic_load_n(u->cq_tail, __ATOMIC_ACQUIRE);
    while (head != tail) {
        struct io_uring_cqe *c = &u->cqes[head & *u->cq_mask];
        uint64_t id = c->user_data;
        if (id < VBLK_SLOTS && e->slots[id].used)
            complete(e, (int)id, c->res);
        head++;
        n++;
    }
    __atomic_store_n(u->cq_head, head, __ATOMIC_RELEASE);
    return n;
}

static void drain_io(struct vblk_engine *e)
{
    submit(e);
    while (e->inflight && e->uring) {
        uring_wait(e->uring);
        reap(e);
        submit(e);
    }
}

/* one pass: take what is available, start its I/O, complete what is
 * done, interrupt if the driver wants it; returns requests taken plus
 * completions, or -1 if the ring broke */
static int pump(struct vblk_engine *e)
{
    int taken = 0, r = 0;
    while (e->nfree && (r = take(e, 1)) > 0)
        taken++;
    submit(e);
    int done = reap(e);
    if (taken || done)
        interrupt(e);
    e->rs.requests += (uint64_t)taken;
    if ((uint64_t)taken > e->rs.max_pass)
        e->rs.max_pass = (uint64_t)taken;
    return r < 0 ? -1 : taken + done;
}

/* -- the loop -------------------------------------------------------------------------- */

static int stop_requested(struct vblk_engine *e)
{
    struct pollfd p = {e->stop_fd, POLLIN, 0};
    return poll(&p, 1, 0) > 0 && (p.revents & (POLLIN | POLLHUP | POLLERR | POLLNVAL));
}

static void set_window(struct vblk_engine *e, int64_t w)
{
    e->window = w;
    e->rs.window_ns = w;
    if (w < e->rs.window_min_ns)
        e->rs.window_min_ns = w;
    if (w > e->rs.window_max_ns)
        e->rs.window_max_ns = w;
}

/* leave with nothing in flight and everything answered */
static int leave(struct vblk_engine *e, int why)
{
    drain_io(e);
    if (e->ready && !e->broken)
        interrupt(e);
    if (why == VBLK_STOP && e->ready && !e->broken)
        notifications_on(e);        /* whoever serves the queue next is notified */
    return why;
}

int vblk_run(struct vblk_engine *e, int64_t poll_ns)
{
    struct vblk_run_stats *s = &e->rs;
    if (poll_ns < 0)
        poll_ns = 0;
    if (e->window < 0 || e->window > poll_ns) {
        e->window = poll_ns;
        s->window_ns = s->window_min_ns = s->window_max_ns = poll_ns;
    }
    notifications_off(e);
    int64_t last_work = hv_now_ns(), checked = last_work - CONTENTION_CHECK_NS - 1;
    prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);     /* naps of microseconds */
    unsigned spins = 0;
    int polling = 0;                /* looking at the ring since last_work, no notification */
    for (;;) {
        int n = pump(e);
        s->passes++;
        if (n < 0)
            return leave(e, VBLK_BROKEN);
        int64_t t = hv_now_ns();
        if (n) {
            s->work_passes++;
            if (polling) {
                s->poll_hits++;
                s->poll_ns += (uint64_t)(t - last_work);
            }
            last_work = t;
            polling = 1;
        }
        /* the stop fd: after every pass with work, every 64th idle one */
        if ((n || (++spins & 63) == 0) && stop_requested(e))
            return leave(e, VBLK_STOP);
        if (n)
            continue;
        if (e->inflight) {
            /* I/O in flight, nothing new: block on the ring, the driver
             * still told not to notify (what it adds meanwhile is taken at
             * the next completion) */
            s->io_waits++;
            uring_wait(e->uring);
            int64_t w = hv_now_ns();
            s->io_wait_ns += (uint64_t)(w - t);
            last_work = w;
            continue;
        }
        if (e->window && t - checked > CONTENTION_CHECK_NS) {
            checked = t;
            int busy = !e->poll_always && hv_cpus_contended(e->loadavg_fd, e->ncpus);
            if (busy && !e->napping)
                s->contended++;
            e->napping = busy;
        }
        if (t - last_work < e->window) {
            if (e->napping) {
                /* more runnable threads than CPUs: spinning would take the
                 * core the vCPU needs, so look again after a timed sleep
                 * instead (still no notification asked for: the request
                 * the driver adds meanwhile costs it no exit) */
                struct pollfd p[2] = {{e->kick_fd, POLLIN, 0}, {e->stop_fd, POLLIN, 0}};
                int64_t left = e->window - (t - last_work);
                struct timespec ts = {left / 1000000000, left % 1000000000};
                s->naps++;
                if (ppoll(p, 2, &ts, NULL) > 0) {
                    if (p[1].revents)
                        return leave(e, VBLK_STOP);
                    if (p[0].revents & POLLIN)
                        hv_drain_fd(e->kick_fd);
                }
                continue;
            }
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
            continue;
        }
        if (polling)
            s->poll_ns += (uint64_t)(t - last_work);
        /* going idle: ask for a notification, then look once more so that
         * a request added in between is not missed */
        if (notifications_on(e)) {
            s->rearm_saves++;
            notifications_off(e);
            continue;
        }
        if (e->broken)
            return leave(e, VBLK_BROKEN);
        struct pollfd p[2] = {{e->kick_fd, POLLIN, 0}, {e->stop_fd, POLLIN, 0}};
        s->sleeps++;
        int64_t slept = hv_now_ns();
        int r = poll(p, 2, 1000);
        int64_t woke = hv_now_ns();
        s->sleep_ns += (uint64_t)(woke - slept);
        if (r < 0 && errno != EINTR)
            return leave(e, -errno);
        if (p[1].revents)
            return leave(e, VBLK_STOP);
        if (p[0].revents & POLLIN) {
            hv_drain_fd(e->kick_fd);
            s->kicks++;
            /* a notification that came within poll_ns of the last request
             * would have been caught by a window that long: grow it */
            if (woke - last_work <= poll_ns && poll_ns) {
                int64_t w = e->window * 2 < POLL_MIN_NS ? POLL_MIN_NS : e->window * 2;
                set_window(e, w < poll_ns ? w : poll_ns);
            } else if (woke - last_work > poll_ns) {
                set_window(e, e->window / 2);
            }
        } else if (r == 0) {
            s->timeouts++;
            set_window(e, e->window / 2);
        }
        notifications_off(e);
        last_work = hv_now_ns();
        polling = 0;
    }
}
