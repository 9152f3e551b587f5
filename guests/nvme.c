/* A freestanding NVMe driver: PCI scan, controller enable, admin queue,
 * Identify, I/O queues, Doorbell Buffer Config, then writes and reads with
 * a pattern checked end to end. Runs at CPL3 and polls completions.
 *
 * Arguments (key=value, space separated):
 *   shadow=1   use shadow doorbells + EventIdx (Doorbell Buffer Config)
 *   ios=N      number of I/Os in the data phase (default 256)
 *   qd=N       queue depth (1..63, default 1)
 *   bench=1    random 4 KiB I/O: half writes then half reads, timed with the
 *              TSC; hypercall 0x1201 marks the start of the timed phase and
 *              0x1200 reports (ios, qd, cycles, write cycles, address and
 *              count of per-I/O latencies in cycles). Every read is
 *              checked: the data written to an LBA is a function of the LBA.
 *              Hypercall 0x1202 reports, for the timed phase, how often the
 *              I/O queue's MMIO doorbells were rung (SQ, CQ), the number of
 *              submission batches and of reap rounds, and the TSC cycles
 *              spent waiting for completions and ringing doorbells.
 *   lbas=N     size of the range used, in 4 KiB pages (default 4096)
 * Exit code 0 on success; otherwise the failing step (see fail()).
 */
#include "runtime/hvkit.h"

#define PAGE 4096
#define ASQ_ENTRIES 32
#define IOQ_ENTRIES 64
#define HC_NVME_RESULT 0x1200
#define HC_NVME_START 0x1201
#define HC_NVME_STATS 0x1202
#define MAX_LAT 65536

struct sqe {
    u8 opc, flags;
    u16 cid;
    u32 nsid;
    u64 rsvd;
    u64 mptr;
    u64 prp1, prp2;
    u32 cdw10, cdw11, cdw12, cdw13, cdw14, cdw15;
};

struct cqe {
    u32 dw0, dw1;
    u16 sqhd, sqid;
    u16 cid, status;   /* status bit 0 is the phase tag */
};

static struct sqe asq[ASQ_ENTRIES] __attribute__((aligned(PAGE)));
static struct cqe acq[ASQ_ENTRIES] __attribute__((aligned(PAGE)));
static struct sqe iosq[IOQ_ENTRIES] __attribute__((aligned(PAGE)));
static struct cqe iocq[IOQ_ENTRIES] __attribute__((aligned(PAGE)));
static u8 ident[PAGE] __attribute__((aligned(PAGE)));
static u32 shadow_db[PAGE / 4] __attribute__((aligned(PAGE)));
static u32 event_idx[PAGE / 4] __attribute__((aligned(PAGE)));
static u8 bufs[IOQ_ENTRIES][PAGE] __attribute__((aligned(PAGE)));
static u8 big[4 * PAGE] __attribute__((aligned(PAGE)));
static u64 prp_list[PAGE / 8] __attribute__((aligned(PAGE)));
static u64 lat[MAX_LAT];            /* per-I/O latency in TSC cycles (bench) */
static u64 submitted_at[IOQ_ENTRIES];

/* the timed phase's own account of where the guest's time goes */
static struct {
    u64 sq_rings, cq_rings, submits, reaps, wait_cycles, ring_cycles;
} acct;

static volatile u8 *regs;
static u32 dstrd;
static int use_shadow;

struct queue {
    struct sqe *sq;
    volatile struct cqe *cq;
    u16 qid, size, tail, head, phase, sq_old_tail, cq_old_head;
};
static struct queue aq, ioq;

static void fail(int step, const char *what, u32 detail)
{
    rt_printf("nvme: FAILED at step %d (%s): %x\n", step, what, detail);
    rt_exit(step);
}

static u32 r32(u32 off) { return *(volatile u32 *)(regs + off); }
static u64 r64(u32 off) { return (u64)r32(off) | ((u64)r32(off + 4) << 32); }
static void w32(u32 off, u32 v) { *(volatile u32 *)(regs + off) = v; }
static void w64(u32 off, u64 v) { w32(off, (u32)v); w32(off + 4, (u32)(v >> 32)); }

static u32 pci_read(int dev, int reg)
{
    outl(0xCF8, 0x80000000u | (u32)dev << 11 | (u32)reg);
    return inl(0xCFC);
}

static void pci_write(int dev, int reg, u32 v)
{
    outl(0xCF8, 0x80000000u | (u32)dev << 11 | (u32)reg);
    outl(0xCFC, v);
}

static u32 sq_db(int y) { return 0x1000 + (2 * y) * (4u << dstrd); }
static u32 cq_db(int y) { return 0x1000 + (2 * y + 1) * (4u << dstrd); }

/* The spec's rule: ring the MMIO doorbell only if the controller's EventIdx
 * lies in (old, new]. */
static int need_event(u16 event, u16 new_idx, u16 old)
{
    return (u16)(new_idx - event - 1) < (u16)(new_idx - old);
}

static void ring_sq(struct queue *q)
{
    if (use_shadow && q->qid) {
        __atomic_store_n(&shadow_db[2 * q->qid * (1u << dstrd)], q->tail, __ATOMIC_SEQ_CST);
        u16 ev = (u16)__atomic_load_n(&event_idx[2 * q->qid * (1u << dstrd)], __ATOMIC_SEQ_CST);
        if (need_event(ev, q->tail, q->sq_old_tail)) {
            u64 t = rdtsc();
            w32(sq_db(q->qid), q->tail);
            acct.ring_cycles += rdtsc() - t;
            acct.sq_rings++;
        }
    } else {
        u64 t = rdtsc();
        w32(sq_db(q->qid), q->tail);
        if (q->qid) {
            acct.ring_cycles += rdtsc() - t;
            acct.sq_rings++;
        }
    }
    q->sq_old_tail = q->tail;
}

static void ring_cq(struct queue *q)
{
    if (use_shadow && q->qid) {
        __atomic_store_n(&shadow_db[(2 * q->qid + 1) * (1u << dstrd)], q->head, __ATOMIC_SEQ_CST);
        u16 ev = (u16)__atomic_load_n(&event_idx[(2 * q->qid + 1) * (1u << dstrd)], __ATOMIC_SEQ_CST);
        if (need_event(ev, q->head, q->cq_old_head)) {
            u64 t = rdtsc();
            w32(cq_db(q->qid), q->head);
            acct.ring_cycles += rdtsc() - t;
            acct.cq_rings++;
        }
    } else {
        u64 t = rdtsc();
        w32(cq_db(q->qid), q->head);
        if (q->qid) {
            acct.ring_cycles += rdtsc() - t;
            acct.cq_rings++;
        }
    }
    q->cq_old_head = q->head;
}

static u16 next_cid;

/* cid < 0x8000: a buffer slot chosen by the caller; otherwise a fresh id. */
static u16 submit_cid(struct queue *q, struct sqe *e, int ring, u16 cid)
{
    e->cid = cid;
    q->sq[q->tail] = *e;
    q->tail = (u16)((q->tail + 1) % q->size);
    if (ring)
        ring_sq(q);
    return e->cid;
}

static u16 submit(struct queue *q, struct sqe *e, int ring)
{
    e->cid = 0x8000 | next_cid++;
    q->sq[q->tail] = *e;
    q->tail = (u16)((q->tail + 1) % q->size);
    if (ring)
        ring_sq(q);
    return e->cid;
}

/* Poll for one completion; returns its status (0 = success). */
static u16 reap(struct queue *q, u16 *cid)
{
    u64 spins = 0, t = 0;
    while ((__atomic_load_n(&q->cq[q->head].status, __ATOMIC_ACQUIRE) & 1) != q->phase) {
        if (!spins)
            t = rdtsc();
        cpu_relax();
        if (++spins == 4000000000ul)
            fail(90, "completion timeout", q->qid);
    }
    if (spins && q->qid)
        acct.wait_cycles += rdtsc() - t;
    volatile struct cqe *c = &q->cq[q->head];
    u16 status = c->status >> 1;
    if (cid)
        *cid = c->cid;
    q->head = (u16)((q->head + 1) % q->size);
    if (q->head == 0)
        q->phase ^= 1;
    return status;
}

static u16 admin(struct sqe *e)
{
    submit(&aq, e, 1);
    u16 st = reap(&aq, 0);
    ring_cq(&aq);
    return st;
}

static u32 per_page = 1;   /* namespace blocks per 4 KiB page */

/* I/O in units of 4 KiB pages, whatever the namespace's block size. */
static void io_cmd(struct sqe *e, u8 opc, u64 page, u32 pages, void *buf)
{
    u64 lba = page * per_page;
    memset(e, 0, sizeof(*e));
    e->opc = opc;
    e->nsid = 1;
    e->prp1 = (u64)buf;
    e->cdw10 = (u32)lba;
    e->cdw11 = (u32)(lba >> 32);
    e->cdw12 = pages * per_page - 1;
}

static void fill(u8 *p, u64 lba, u32 seed)
{
    for (int i = 0; i < PAGE; i += 8)
        *(u64 *)(p + i) = (lba << 32) ^ (u64)(i * 2654435761u) ^ seed;
}

static int check(const u8 *p, u64 lba, u32 seed)
{
    for (int i = 0; i < PAGE; i += 8)
        if (*(const u64 *)(p + i) != ((lba << 32) ^ (u64)(i * 2654435761u) ^ seed))
            return 0;
    return 1;
}

static u64 rng = 88172645463325252ul;
static u64 next_rand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static int find_nvme(void)
{
    for (int dev = 0; dev < 32; dev++) {
        u32 id = pci_read(dev, 0);
        if ((id & 0xFFFF) == 0xFFFF)
            continue;
        u32 cls = pci_read(dev, 8) >> 8;
        if (cls == 0x010802)
            return dev;
    }
    return -1;
}

int main(int cpu, int ncpus, const char *args)
{
    (void)ncpus;
    if (cpu != 0)
        return 0;
    use_shadow = rt_arg_int(args, "shadow", 0);
    int ios = rt_arg_int(args, "ios", 256);
    int qd = rt_arg_int(args, "qd", 1);
    int bench = rt_arg_int(args, "bench", 0);
    u64 lbas = (u64)rt_arg_int(args, "lbas", 4096);
    if (qd < 1 || qd >= IOQ_ENTRIES)
        fail(1, "qd out of range", (u32)qd);

    int dev = find_nvme();
    if (dev < 0)
        fail(2, "no NVMe controller on PCI bus 0", 0);
    u32 bar0 = pci_read(dev, 0x10), bar1 = pci_read(dev, 0x14);
    u64 base = (bar0 & ~0xFu) | ((bar0 & 0x6) == 0x4 ? (u64)bar1 << 32 : 0);
    pci_write(dev, 0x04, pci_read(dev, 0x04) | 0x6);   /* memory + bus master */
    regs = (volatile u8 *)base;

    u64 cap = r64(0x00);
    dstrd = (u32)(cap >> 32) & 0xF;
    u32 mqes = (u32)(cap & 0xFFFF) + 1;
    rt_printf("nvme: controller at 00:%d.0 bar0 %lx cap %lx vs %x\n", dev, base, cap, r32(0x08));
    if (mqes < IOQ_ENTRIES)
        fail(3, "MQES too small", mqes);

    /* Reset, program the admin queue, enable. */
    w32(0x14, 0);
    while (r32(0x1C) & 1)
        cpu_relax();
    w32(0x24, (ASQ_ENTRIES - 1) << 16 | (ASQ_ENTRIES - 1));
    w64(0x28, (u64)asq);
    w64(0x30, (u64)acq);
    w32(0x14, 1 | (6 << 16) | (4 << 20));
    while (!(r32(0x1C) & 1)) {
        if (r32(0x1C) & 2)
            fail(4, "controller fatal status", r32(0x1C));
        cpu_relax();
    }
    aq = (struct queue){ asq, acq, 0, ASQ_ENTRIES, 0, 0, 1, 0, 0 };

    struct sqe e;
    memset(&e, 0, sizeof(e));
    e.opc = 0x06;           /* Identify controller */
    e.prp1 = (u64)ident;
    e.cdw10 = 1;
    u16 st = admin(&e);
    if (st)
        fail(5, "identify controller", st);
    u16 oacs = *(u16 *)(ident + 256);
    u32 nn = *(u32 *)(ident + 516);
    char model[41];
    memcpy(model, ident + 24, 40);
    model[40] = 0;
    rt_printf("nvme: model '%s' namespaces %u oacs %x\n", model, nn, oacs);

    memset(&e, 0, sizeof(e));
    e.opc = 0x06;           /* Identify namespace 1 */
    e.nsid = 1;
    e.prp1 = (u64)ident;
    e.cdw10 = 0;
    if ((st = admin(&e)))
        fail(6, "identify namespace", st);
    u64 nsze = *(u64 *)ident;
    u8 flbas = ident[26] & 0xF;
    u32 lbads = ident[128 + 4 * flbas + 2];
    rt_printf("nvme: ns1 %lu blocks of %u bytes\n", nsze, 1u << lbads);
    if (lbads < 9 || lbads > 12)
        fail(7, "namespace block size is not 512 B..4 KiB", lbads);
    per_page = 1u << (12 - lbads);
    if (lbas > nsze / per_page)
        lbas = nsze / per_page;

    memset(&e, 0, sizeof(e));
    e.opc = 0x09;           /* Set Features: number of queues */
    e.cdw10 = 0x07;
    e.cdw11 = 0;
    if ((st = admin(&e)))
        fail(8, "set features number of queues", st);

    memset(&e, 0, sizeof(e));
    e.opc = 0x05;           /* Create I/O CQ 1, polled */
    e.prp1 = (u64)iocq;
    e.cdw10 = (IOQ_ENTRIES - 1) << 16 | 1;
    e.cdw11 = 1;
    if ((st = admin(&e)))
        fail(9, "create I/O completion queue", st);
    memset(&e, 0, sizeof(e));
    e.opc = 0x01;           /* Create I/O SQ 1 on CQ 1 */
    e.prp1 = (u64)iosq;
    e.cdw10 = (IOQ_ENTRIES - 1) << 16 | 1;
    e.cdw11 = 1 << 16 | 1;
    if ((st = admin(&e)))
        fail(10, "create I/O submission queue", st);
    ioq = (struct queue){ iosq, iocq, 1, IOQ_ENTRIES, 0, 0, 1, 0, 0 };

    if (use_shadow) {
        /* MSI-X on (every vector stays masked: this driver polls): the
         * controller refuses shadow doorbells with pin interrupts */
        int cap = (int)(pci_read(dev, 0x34) & 0xFC);
        while (cap && ((pci_read(dev, cap) & 0xFF) != 0x11))
            cap = (int)((pci_read(dev, cap) >> 8) & 0xFC);
        if (!cap)
            fail(25, "no MSI-X capability", 0);
        pci_write(dev, cap, pci_read(dev, cap) | (0x8000u << 16));
        if (!(oacs & (1 << 8)))
            fail(11, "controller lacks Doorbell Buffer Config", oacs);
        memset(&e, 0, sizeof(e));
        e.opc = 0x7C;
        e.prp1 = (u64)shadow_db;
        e.prp2 = (u64)event_idx;
        if ((st = admin(&e)))
            fail(12, "doorbell buffer config", st);
        rt_puts("nvme: shadow doorbells on\n");
    }

    /* A multi-page transfer through a PRP list, checked end to end. */
    for (int i = 0; i < 4; i++)
        fill(big + i * PAGE, 100 + (u64)i, 0xB16);
    io_cmd(&e, 0x01, 100, 4, big);
    prp_list[0] = (u64)(big + PAGE);
    prp_list[1] = (u64)(big + 2 * PAGE);
    prp_list[2] = (u64)(big + 3 * PAGE);
    e.prp2 = (u64)prp_list;
    submit(&ioq, &e, 1);
    if ((st = reap(&ioq, 0)))
        fail(13, "16 KiB write with a PRP list", st);
    ring_cq(&ioq);
    memset(big, 0, sizeof(big));
    io_cmd(&e, 0x02, 100, 4, big);
    e.prp2 = (u64)prp_list;
    submit(&ioq, &e, 1);
    if ((st = reap(&ioq, 0)))
        fail(14, "16 KiB read with a PRP list", st);
    ring_cq(&ioq);
    for (int i = 0; i < 4; i++)
        if (!check(big + i * PAGE, 100 + (u64)i, 0xB16))
            fail(15, "PRP list data mismatch", (u32)i);

    /* Flush, and Write Zeroes read back as zeros. */
    memset(&e, 0, sizeof(e));
    e.opc = 0x00;
    e.nsid = 1;
    submit(&ioq, &e, 1);
    if ((st = reap(&ioq, 0)))
        fail(16, "flush", st);
    ring_cq(&ioq);
    io_cmd(&e, 0x08, 101, 1, 0);
    submit(&ioq, &e, 1);
    if ((st = reap(&ioq, 0)))
        fail(17, "write zeroes", st);
    ring_cq(&ioq);
    memset(bufs[0], 0xEE, PAGE);
    io_cmd(&e, 0x02, 101, 1, bufs[0]);
    submit(&ioq, &e, 1);
    if ((st = reap(&ioq, 0)))
        fail(18, "read after write zeroes", st);
    ring_cq(&ioq);
    for (int i = 0; i < PAGE; i++)
        if (bufs[0][i])
            fail(19, "write zeroes left data", (u32)i);

    /* The data phase: writes then reads of random LBAs at queue depth qd. */
    static u64 lba_of[IOQ_ENTRIES];
    /* Buffer slots are handed out from a free stack and come back on
     * completion, in whatever order the controller completes. */
    static u16 free_slots[IOQ_ENTRIES];
    int nfree = 0;
    for (int i = 0; i < IOQ_ENTRIES; i++)
        free_slots[nfree++] = (u16)i;
    int nlat = 0;
    if (bench)
        rt_hypercall(HC_NVME_START, 0, 0, 0, 0, 0, 0);
    memset(&acct, 0, sizeof(acct));
    u64 t0 = rdtsc(), t_w = 0;
    int done = 0, issued = 0, inflight = 0;
    int writes = ios / 2 ? ios / 2 : 1;
    for (int phase = 0; phase < 2; phase++) {
        int n = phase == 0 ? writes : ios - writes;
        if (n <= 0)
            n = writes;
        issued = done = 0;
        rng = 88172645463325252ul;        /* reads revisit the written LBAs */
        while (done < n) {
            int batch = 0;
            while (inflight < qd && issued < n) {
                int slot = free_slots[--nfree];
                u64 lba = bench ? next_rand() % lbas : (u64)issued % lbas;
                lba_of[slot] = lba;
                submitted_at[slot] = rdtsc();
                if (phase == 0)
                    fill(bufs[slot], lba, 0x5EED);
                io_cmd(&e, phase == 0 ? 0x01 : 0x02, lba, 1, bufs[slot]);
                submit_cid(&ioq, &e, 0, (u16)slot);
                issued++;
                inflight++;
                batch++;
            }
            if (batch) {
                ring_sq(&ioq);
                acct.submits++;
            }
            acct.reaps++;
            u16 cid;
            do {
                if ((st = reap(&ioq, &cid)))
                    fail(20 + phase, phase == 0 ? "write" : "read", st);
                if (cid >= IOQ_ENTRIES)
                    fail(24, "completion for a command never submitted", cid);
                /* Data is a function of the LBA alone, so every read checks. */
                if (phase == 1 && !check(bufs[cid], lba_of[cid], 0x5EED)) {
                    u64 got = *(u64 *)bufs[cid];
                    rt_printf("nvme: slot %u lba %lx holds %lx (lba %lx seed %lx)\n", cid,
                              lba_of[cid], got, got >> 32, got & 0xFFFFFFFF);
                    fail(23, "data mismatch at LBA", (u32)lba_of[cid]);
                }
                if (nlat < MAX_LAT)
                    lat[nlat++] = rdtsc() - submitted_at[cid];
                free_slots[nfree++] = cid;
                inflight--;
                done++;
            } while (inflight > 0 && (__atomic_load_n(&ioq.cq[ioq.head].status, __ATOMIC_ACQUIRE) & 1) == ioq.phase);
            ring_cq(&ioq);
        }
        if (phase == 0)
            t_w = rdtsc() - t0;
    }
    u64 t_total = rdtsc() - t0;
    rt_printf("nvme: %d I/Os at qd %d in %lu cycles (writes %lu)\n", ios, qd, t_total, t_w);
    if (bench)
        rt_hypercall(HC_NVME_STATS, acct.sq_rings, acct.cq_rings, acct.submits, acct.reaps,
                     acct.wait_cycles, acct.ring_cycles);
    if (bench)
        rt_hypercall(HC_NVME_RESULT, (u64)ios, (u64)qd, t_total, t_w, (u64)lat, (u64)nlat);
    rt_puts("nvme: ok\n");
    return 0;
}
