/* A freestanding virtio-blk driver over virtio-pci or virtio-mmio: feature
 * negotiation, one polled request queue, GET_ID, a multi-segment write and
 * read, flush, write-zeroes, then writes and reads of a pattern at a chosen
 * queue depth, every read checked. Runs at CPL3.
 *
 * Arguments (key=value, space separated):
 *   mmio=1     use the virtio-mmio device instead of virtio-pci
 *   ios=N      I/Os in the data phase (default 256): N/2 writes, N/2 reads
 *   qd=N       queue depth (1..64, default 1)
 *   lbas=N     pages (4 KiB) of the disk used (default 4096; capped at its size)
 *   bench=1    random pages, timed with the TSC; hypercall 0x1401 marks the
 *              start, 0x1400 reports (ios, qd, cycles, write cycles,
 *              notifications, address and count of per-I/O latencies)
 *   event_idx=0  do not negotiate VIRTIO_F_EVENT_IDX
 *   irq=1      ask for interrupts (MSI-X vector or IOAPIC pin -> vector 0x40)
 *              and check that one is pending in the local APIC afterwards
 *   intx=1     with irq=1 on PCI: INTx instead of MSI-X; the ISR register
 *              must show the queue interrupt, and reading it lowers the line
 *   seed=N     the pattern's seed (default 0x5EED)
 * The pattern of page p is a function of p and the seed (see fill()), so the
 * host can check what the guest wrote. Exit code 0 on success, otherwise
 * the failing step.
 */
#include "virtio.h"

#define PAGE 4096
#define SECTOR 512
#define MAX_QD 64
#define MAX_LAT 65536
#define HC_RESULT 0x1400
#define HC_START 0x1401
#define IRQ_VECTOR 0x40

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define T_WRITE_ZEROES 13
#define F_RO 5
#define F_FLUSH 9
#define F_WRITE_ZEROES 14

struct req_hdr { u32 type, reserved; u64 sector; };
struct wz_seg { u64 sector; u32 num_sectors, flags; };

static u8 ring_mem[4 * PAGE] __attribute__((aligned(PAGE)));
static struct req_hdr hdrs[MAX_QD];
static volatile u8 status[MAX_QD];
static u8 bufs[MAX_QD][PAGE] __attribute__((aligned(PAGE)));
static u8 big[4 * PAGE] __attribute__((aligned(PAGE)));
static struct wz_seg wz;
static u64 lat[MAX_LAT];
static u64 submitted_at[MAX_QD];
static u64 page_of[MAX_QD];

static struct vdev dev;
static struct vq q;
static u32 seed = 0x5EED;

static void fill(u8 *p, u64 page)
{
    for (int i = 0; i < PAGE; i += 8)
        *(u64 *)(p + i) = (page << 32) ^ (u64)(i * 2654435761u) ^ seed;
}

static int check(const u8 *p, u64 page)
{
    for (int i = 0; i < PAGE; i += 8)
        if (*(const u64 *)(p + i) != ((page << 32) ^ (u64)(i * 2654435761u) ^ seed))
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

/* A completed request's status or data read differently for a moment
 * (vq_pop explains): look again a few times before calling it a failure. */
static int settled_status(int s)
{
    for (int i = 0; i < 1000 && status[s] == 0xFF; i++) {
        vq_glitches++;
        for (int j = 0; j < 1000; j++)
            cpu_relax();
    }
    return status[s] == 0;
}

static int settled_check(const u8 *p, u64 page)
{
    for (int i = 0; i < 100; i++) {
        if (check(p, page))
            return 1;
        vq_glitches++;
        for (int j = 0; j < 10000; j++)
            cpu_relax();
    }
    return 0;
}

/* Slot s owns descriptors 3s..3s+2: header, data, status. The data
 * descriptor is left out (len 0 request) when ``len`` is 0. */
static void prepare(int s, u32 type, u64 sector, void *data, u32 len, int device_writes)
{
    hdrs[s] = (struct req_hdr){ type, 0, sector };
    status[s] = 0xFF;
    struct vdesc *d = &q.desc[3 * s];
    d[0] = (struct vdesc){ (u64)&hdrs[s], sizeof(hdrs[s]), VRING_DESC_F_NEXT, (u16)(3 * s + 1) };
    if (len) {
        d[1] = (struct vdesc){ (u64)data, len,
                               (u16)(VRING_DESC_F_NEXT | (device_writes ? VRING_DESC_F_WRITE : 0)),
                               (u16)(3 * s + 2) };
    } else {
        d[0].next = (u16)(3 * s + 2);
    }
    d[2] = (struct vdesc){ (u64)&status[s], 1, VRING_DESC_F_WRITE, 0 };
    vq_push(&q, (u16)(3 * s));
}

/* Wait for one completion; returns its slot. */
static int wait_one(void)
{
    u32 id, len;
    u64 spins = 0;
    while (!vq_pop(&q, &id, &len)) {
        cpu_relax();
        if (++spins == 4000000000ul)
            vfail(90, "completion timeout", q.last_used);
    }
    if (id % 3 || id / 3 >= MAX_QD)
        vfail(91, "used element names no request", id);
    return (int)(id / 3);
}

/* One request at a time, for the set-up steps; returns its status. */
static u8 sync_req(u32 type, u64 sector, void *data, u32 len, int device_writes)
{
    prepare(0, type, sector, data, len, device_writes);
    vq_kick(&dev, &q);
    int s = wait_one();
    if (s != 0)
        vfail(92, "completion for another slot", (u64)s);
    return status[0];
}

int main(int cpu, int ncpus, const char *args)
{
    (void)ncpus;
    if (cpu != 0)
        return 0;
    int use_mmio = rt_arg_int(args, "mmio", 0);
    int ios = rt_arg_int(args, "ios", 256);
    int qd = rt_arg_int(args, "qd", 1);
    int bench = rt_arg_int(args, "bench", 0);
    int want_irq = rt_arg_int(args, "irq", 0);
    intx_mode = rt_arg_int(args, "intx", 0);
    int want_event_idx = rt_arg_int(args, "event_idx", 1);
    u64 pages = (u64)rt_arg_int(args, "lbas", 4096);
    seed = (u32)rt_arg_int(args, "seed", 0x5EED);
    if (qd < 1 || qd > MAX_QD)
        vfail(1, "qd out of range", (u64)qd);

    if (!(use_mmio ? virtio_find_mmio(&dev, 2) : virtio_find_pci(&dev, 2)))
        vfail(1, use_mmio ? "no virtio-blk on virtio-mmio" : "no virtio-blk on PCI bus 0", 0);
    virtio_init(&dev, (1ul << F_RO) | (1ul << F_FLUSH) | (1ul << F_WRITE_ZEROES)
                | (want_event_idx ? 1ul << VIRTIO_F_EVENT_IDX : 0));
    u64 capacity = *(volatile u64 *)dev.devcfg;         /* in 512-byte sectors */
    rt_printf("virtio-blk: %s, %lu sectors, features %lx\n",
              use_mmio ? "virtio-mmio" : "virtio-pci", capacity, dev.features);
    if (want_irq)
        virtio_route_irq(&dev, IRQ_VECTOR);
    virtio_queue(&dev, &q, 0, 256, ring_mem, want_irq && !dev.mmio && !intx_mode ? 0 : 0xFFFF);
    if (q.size < 3 * qd)
        vfail(6, "queue too small for the queue depth", q.size);
    vq_interrupts(&dev, &q, want_irq);
    virtio_driver_ok(&dev);
    if (pages > capacity / (PAGE / SECTOR))
        pages = capacity / (PAGE / SECTOR);
    if (pages < 128)
        vfail(8, "disk smaller than 512 KiB", capacity);

    /* GET_ID */
    memset(big, 0, 20);
    u8 st = sync_req(T_GET_ID, 0, big, 20, 1);
    if (st)
        vfail(9, "get id", st);
    big[20] = 0;
    rt_printf("virtio-blk: id '%s'\n", (char *)big);

    int read_only = (int)(dev.features >> F_RO & 1);
    if (read_only) {
        /* A read-only disk: a write must fail, a read must work. */
        if (sync_req(T_OUT, 0, bufs[0], PAGE, 0) == 0)
            vfail(10, "write to a read-only disk succeeded", 0);
        if ((st = sync_req(T_IN, 0, bufs[0], PAGE, 1)))
            vfail(11, "read of a read-only disk", st);
        rt_puts("virtio-blk: read-only ok\n");
        return 0;
    }

    /* A 16 KiB transfer in one descriptor, checked. */
    for (int i = 0; i < 4; i++)
        fill(big + i * PAGE, 100 + (u64)i);
    if ((st = sync_req(T_OUT, 100 * (PAGE / SECTOR), big, 4 * PAGE, 0)))
        vfail(12, "16 KiB write", st);
    memset(big, 0, sizeof(big));
    if ((st = sync_req(T_IN, 100 * (PAGE / SECTOR), big, 4 * PAGE, 1)))
        vfail(13, "16 KiB read", st);
    for (int i = 0; i < 4; i++)
        if (!check(big + i * PAGE, 100 + (u64)i))
            vfail(14, "16 KiB read back differs", (u64)i);

    /* Flush; write-zeroes reads back as zeros; a read past the end fails. */
    if (dev.features >> F_FLUSH & 1 && (st = sync_req(T_FLUSH, 0, 0, 0, 0)))
        vfail(15, "flush", st);
    if (dev.features >> F_WRITE_ZEROES & 1) {
        wz = (struct wz_seg){ 101 * (PAGE / SECTOR), PAGE / SECTOR, 0 };
        if ((st = sync_req(T_WRITE_ZEROES, 0, &wz, sizeof(wz), 0)))
            vfail(16, "write zeroes", st);
        memset(bufs[0], 0xEE, PAGE);
        if ((st = sync_req(T_IN, 101 * (PAGE / SECTOR), bufs[0], PAGE, 1)))
            vfail(17, "read after write zeroes", st);
        for (int i = 0; i < PAGE; i++)
            if (bufs[0][i])
                vfail(18, "write zeroes left data", (u64)i);
    }
    if (sync_req(T_IN, capacity, bufs[0], PAGE, 1) == 0)
        vfail(19, "read past the end succeeded", capacity);

    /* The data phase: writes then reads at queue depth qd. */
    static u16 free_slots[MAX_QD];
    int nfree = 0;
    for (int i = 0; i < qd; i++)
        free_slots[nfree++] = (u16)i;
    int nlat = 0;
    if (bench)
        rt_hypercall(HC_START, 0, 0, 0, 0, 0, 0);
    u64 notifies0 = q.notifies;
    u64 t0 = rdtsc(), t_w = 0;
    int writes = ios / 2 ? ios / 2 : 1;
    for (int phase = 0; phase < 2; phase++) {
        int n = phase == 0 ? writes : ios - writes;
        if (n <= 0)
            n = writes;
        int issued = 0, done = 0, inflight = 0;
        rng = 88172645463325252ul;        /* reads revisit the written pages */
        while (done < n) {
            int batch = 0;
            while (inflight < qd && issued < n) {
                int s = free_slots[--nfree];
                u64 page = bench ? next_rand() % pages : (u64)issued % pages;
                page_of[s] = page;
                submitted_at[s] = rdtsc();
                if (phase == 0)
                    fill(bufs[s], page);
                prepare(s, phase == 0 ? T_OUT : T_IN, page * (PAGE / SECTOR), bufs[s], PAGE,
                        phase == 1);
                issued++;
                inflight++;
                batch++;
            }
            if (batch)
                vq_kick(&dev, &q);
            u32 id, len;
            int s = wait_one();
            for (;;) {
                if (status[s] && !settled_status(s))
                    vfail(20 + phase, phase == 0 ? "write" : "read", status[s]);
                if (phase == 1 && !settled_check(bufs[s], page_of[s]))
                    vfail(23, "data mismatch at page", page_of[s]);
                if (nlat < MAX_LAT)
                    lat[nlat++] = rdtsc() - submitted_at[s];
                free_slots[nfree++] = (u16)s;
                inflight--;
                done++;
                if (!vq_pop(&q, &id, &len))
                    break;
                if (id % 3 || id / 3 >= MAX_QD)
                    vfail(91, "used element names no request", id);
                s = (int)(id / 3);
            }
            if (!want_irq)
                vq_interrupts(&dev, &q, 0);
        }
        if (phase == 0)
            t_w = rdtsc() - t0;
    }
    u64 t_total = rdtsc() - t0;
    u64 notifies = q.notifies - notifies0;
    rt_printf("virtio-blk: %d I/Os at qd %d in %lu cycles (writes %lu), %lu notifications, "
              "%lu stale reads\n", ios, qd, t_total, t_w, notifies, vq_glitches);
    if (bench)
        rt_hypercall(HC_RESULT, (u64)ios | (u64)qd << 32, t_total, t_w, notifies, (u64)lat,
                     (u64)nlat);
    if (want_irq) {
        if (!lapic_pending(IRQ_VECTOR))
            vfail(30, "no interrupt pending in the local APIC", IRQ_VECTOR);
        if (intx_mode && !dev.mmio) {
            u8 isr = r8(dev.isr, 0);
            if (!(isr & 1))
                vfail(31, "ISR does not show the queue interrupt", isr);
            if (pci_read(dev.pci_dev, 0x04) & (1u << 19))
                vfail(32, "INTx still asserted after the ISR read", 0);
        }
        rt_puts("virtio-blk: interrupt delivered\n");
    }
    rt_puts("virtio-blk: ok\n");
    return 0;
}
