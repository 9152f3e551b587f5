/* A freestanding virtio 1.x driver core for hvkit's guests: finding a
 * device on virtio-pci (bus 0, modern capabilities) or virtio-mmio (the
 * windows from 0xD0000000, one 4 KiB page each), feature negotiation, split
 * virtqueues polled from CPL3, and optional interrupts that a test checks
 * in the local APIC's IRR (the runtime keeps interrupts off at CPL3, so a
 * delivered vector stays pending there).
 *
 * One header, included by one program each: everything is static. */
#ifndef HVKIT_VIRTIO_H
#define HVKIT_VIRTIO_H

#include "runtime/hvkit.h"

#define VIRTIO_MMIO_BASE 0xD0000000ul
#define VIRTIO_MMIO_SLOTS 8
static const int virtio_mmio_irqs[VIRTIO_MMIO_SLOTS] = { 5, 6, 7, 9, 10, 11, 14, 15 };

#define VIRTIO_F_EVENT_IDX 29
#define VIRTIO_F_VERSION_1 32

#define S_ACKNOWLEDGE 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 64
#define S_FAILED 128

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VRING_USED_F_NO_NOTIFY 1

#define QMAX 256
#define LAPIC_BASE 0xFEE00000ul
#define IOAPIC_BASE 0xFEC00000ul

struct vdesc { u64 addr; u32 len; u16 flags, next; };
struct vused_elem { u32 id, len; };

struct vq {
    u16 index, size, avail_idx, last_used, old_avail;
    struct vdesc *desc;
    volatile u16 *avail;            /* flags, idx, ring[size], used_event */
    volatile u8 *used;              /* flags, idx, ring[size] of (id, len), avail_event */
    volatile u16 *notify;           /* PCI: the queue's notify address */
    u64 notifies;                   /* how often the driver notified the device */
};

struct vdev {
    int mmio;                       /* 1: virtio-mmio, 0: virtio-pci */
    int pci_dev, irq;               /* PCI slot; MMIO: the IOAPIC pin */
    volatile u8 *regs;              /* MMIO window */
    volatile u8 *common, *isr, *devcfg, *notify_base;
    u32 notify_mult;
    volatile u32 *msix_table;
    u64 features;
    int event_idx;
};

static inline u8 r8(volatile u8 *p, u32 off) { return *(volatile u8 *)(p + off); }
static inline u16 r16(volatile u8 *p, u32 off) { return *(volatile u16 *)(p + off); }
static inline u32 r32(volatile u8 *p, u32 off) { return *(volatile u32 *)(p + off); }
static inline void w8(volatile u8 *p, u32 off, u8 v) { *(volatile u8 *)(p + off) = v; }
static inline void w16(volatile u8 *p, u32 off, u16 v) { *(volatile u16 *)(p + off) = v; }
static inline void w32(volatile u8 *p, u32 off, u32 v) { *(volatile u32 *)(p + off) = v; }
static inline void w64(volatile u8 *p, u32 off, u64 v) { w32(p, off, (u32)v); w32(p, off + 4, (u32)(v >> 32)); }
static inline void mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

static void vfail(int step, const char *what, u64 detail)
{
    rt_printf("virtio: FAILED at step %d (%s): %lx\n", step, what, detail);
    rt_exit(step);
}

/* -- PCI configuration (mechanism #1) ------------------------------------ */

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

static u64 pci_bar(int dev, int bar)
{
    u32 lo = pci_read(dev, 0x10 + 4 * bar);
    u64 addr = lo & ~0xFu;
    if ((lo & 0x6) == 0x4)
        addr |= (u64)pci_read(dev, 0x14 + 4 * bar) << 32;
    return addr;
}

/* common configuration (struct virtio_pci_common_cfg) */
#define C_DFSELECT 0x00
#define C_DF 0x04
#define C_GFSELECT 0x08
#define C_GF 0x0C
#define C_MSIX_CONFIG 0x10
#define C_NUM_QUEUES 0x12
#define C_STATUS 0x14
#define C_Q_SELECT 0x16
#define C_Q_SIZE 0x18
#define C_Q_MSIX 0x1A
#define C_Q_ENABLE 0x1C
#define C_Q_NOFF 0x1E
#define C_Q_DESC 0x20
#define C_Q_DRIVER 0x28
#define C_Q_DEVICE 0x30

/* virtio-mmio registers */
#define M_MAGIC 0x000
#define M_VERSION 0x004
#define M_DEVICE_ID 0x008
#define M_DF 0x010
#define M_DFSEL 0x014
#define M_GF 0x020
#define M_GFSEL 0x024
#define M_QSEL 0x030
#define M_QNUM_MAX 0x034
#define M_QNUM 0x038
#define M_QREADY 0x044
#define M_QNOTIFY 0x050
#define M_ISR 0x060
#define M_ACK 0x064
#define M_STATUS 0x070
#define M_QDESC 0x080
#define M_QDRIVER 0x090
#define M_QDEVICE 0x0A0
#define M_CONFIG 0x100

static int virtio_find_pci(struct vdev *d, u32 device_id)
{
    for (int dev = 0; dev < 32; dev++) {
        u32 id = pci_read(dev, 0);
        if ((id & 0xFFFF) != 0x1AF4 || (id >> 16) != 0x1040 + device_id)
            continue;
        pci_write(dev, 0x04, pci_read(dev, 0x04) | 0x6);   /* memory + bus master */
        memset(d, 0, sizeof(*d));
        d->pci_dev = dev;
        u32 cap = pci_read(dev, 0x34) & 0xFF;
        for (int guard = 0; cap && guard < 48; guard++) {
            u32 h = pci_read(dev, (int)cap);
            u8 cap_id = h & 0xFF, next = (h >> 8) & 0xFF;
            if (cap_id == 0x09) {
                u8 type = (h >> 24) & 0xFF;
                u8 bar = pci_read(dev, (int)cap + 4) & 0xFF;
                u32 off = pci_read(dev, (int)cap + 8);
                volatile u8 *p = (volatile u8 *)(pci_bar(dev, bar) + off);
                if (type == 1)
                    d->common = p;
                else if (type == 2) {
                    d->notify_base = p;
                    d->notify_mult = pci_read(dev, (int)cap + 16);
                } else if (type == 3)
                    d->isr = p;
                else if (type == 4)
                    d->devcfg = p;
            } else if (cap_id == 0x11) {
                u32 table = pci_read(dev, (int)cap + 4);
                d->msix_table = (volatile u32 *)(pci_bar(dev, table & 7) + (table & ~7u));
            }
            cap = next;
        }
        if (!d->common || !d->notify_base || !d->isr || !d->devcfg)
            vfail(2, "virtio-pci capabilities missing", (u64)dev);
        return 1;
    }
    return 0;
}

static int virtio_find_mmio(struct vdev *d, u32 device_id)
{
    for (int i = 0; i < VIRTIO_MMIO_SLOTS; i++) {
        volatile u8 *r = (volatile u8 *)(VIRTIO_MMIO_BASE + 0x1000ul * (u64)i);
        if (r32(r, M_MAGIC) != 0x74726976 || r32(r, M_DEVICE_ID) != device_id)
            continue;
        if (r32(r, M_VERSION) != 2)
            vfail(2, "virtio-mmio version is not 2", r32(r, M_VERSION));
        memset(d, 0, sizeof(*d));
        d->mmio = 1;
        d->regs = r;
        d->devcfg = r + M_CONFIG;
        d->irq = virtio_mmio_irqs[i];
        return 1;
    }
    return 0;
}

static u8 virtio_status(struct vdev *d)
{
    return d->mmio ? (u8)r32(d->regs, M_STATUS) : r8(d->common, C_STATUS);
}

static void virtio_set_status(struct vdev *d, u8 s)
{
    if (d->mmio)
        w32(d->regs, M_STATUS, s);
    else
        w8(d->common, C_STATUS, s);
}

static u64 virtio_device_features(struct vdev *d)
{
    u64 f = 0;
    for (u32 page = 0; page < 2; page++) {
        if (d->mmio) {
            w32(d->regs, M_DFSEL, page);
            f |= (u64)r32(d->regs, M_DF) << (32 * page);
        } else {
            w32(d->common, C_DFSELECT, page);
            f |= (u64)r32(d->common, C_DF) << (32 * page);
        }
    }
    return f;
}

/* Reset, negotiate (VERSION_1 and what the caller wants of ``wanted``). */
static void virtio_init(struct vdev *d, u64 wanted)
{
    virtio_set_status(d, 0);
    while (virtio_status(d) != 0)
        cpu_relax();
    virtio_set_status(d, S_ACKNOWLEDGE);
    virtio_set_status(d, S_ACKNOWLEDGE | S_DRIVER);
    u64 offered = virtio_device_features(d);
    if (!(offered >> VIRTIO_F_VERSION_1 & 1))
        vfail(3, "device does not offer VERSION_1", offered);
    d->features = offered & (wanted | (1ul << VIRTIO_F_VERSION_1));
    for (u32 page = 0; page < 2; page++) {
        u32 v = (u32)(d->features >> (32 * page));
        if (d->mmio) {
            w32(d->regs, M_GFSEL, page);
            w32(d->regs, M_GF, v);
        } else {
            w32(d->common, C_GFSELECT, page);
            w32(d->common, C_GF, v);
        }
    }
    d->event_idx = (int)(d->features >> VIRTIO_F_EVENT_IDX & 1);
    virtio_set_status(d, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    if (!(virtio_status(d) & S_FEATURES_OK))
        vfail(4, "device refused the features", d->features);
}

static void virtio_driver_ok(struct vdev *d)
{
    virtio_set_status(d, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    if (virtio_status(d) & (S_NEEDS_RESET | S_FAILED))
        vfail(5, "device failed at DRIVER_OK", virtio_status(d));
}

/* Lay out queue ``index`` in ``mem`` (4 KiB aligned, at least
 * 16*n + 6+2n (rounded) + 6+8n bytes) with n entries; ``msix`` is the
 * MSI-X vector (PCI) or 0xFFFF for none. */
static void virtio_queue(struct vdev *d, struct vq *q, u16 index, u16 n, u8 *mem, u16 msix)
{
    memset(q, 0, sizeof(*q));
    u32 max;
    if (d->mmio) {
        w32(d->regs, M_QSEL, index);
        max = r32(d->regs, M_QNUM_MAX);
    } else {
        w16(d->common, C_Q_SELECT, index);
        max = r16(d->common, C_Q_SIZE);
    }
    if (max == 0)
        vfail(6, "queue does not exist", index);
    if (n > max)
        n = (u16)max;
    q->index = index;
    q->size = n;
    q->desc = (struct vdesc *)mem;
    u64 avail_at = (u64)mem + 16ul * n;
    u64 used_at = (avail_at + 6 + 2ul * n + 3) & ~3ul;
    q->avail = (volatile u16 *)avail_at;
    q->used = (volatile u8 *)used_at;
    memset(mem, 0, (size_t)(used_at + 6 + 8ul * n - (u64)mem));
    if (d->mmio) {
        w32(d->regs, M_QNUM, n);
        w64(d->regs, M_QDESC, (u64)q->desc);
        w64(d->regs, M_QDRIVER, avail_at);
        w64(d->regs, M_QDEVICE, used_at);
        w32(d->regs, M_QREADY, 1);
    } else {
        w16(d->common, C_Q_SIZE, n);
        w16(d->common, C_Q_MSIX, msix);
        w64(d->common, C_Q_DESC, (u64)q->desc);
        w64(d->common, C_Q_DRIVER, avail_at);
        w64(d->common, C_Q_DEVICE, used_at);
        u16 noff = r16(d->common, C_Q_NOFF);
        q->notify = (volatile u16 *)(d->notify_base + (u64)noff * d->notify_mult);
        w16(d->common, C_Q_ENABLE, 1);
    }
}

/* stale reads of ring memory noticed and retried (see vq_pop) */
static u64 vq_glitches;

static inline volatile u16 *vq_used_idx(struct vq *q) { return (volatile u16 *)(q->used + 2); }
static inline volatile u16 *vq_avail_event(struct vq *q) { return (volatile u16 *)(q->used + 4 + 8ul * q->size); }

/* Whether the driver wants interrupts for this queue (polling drivers do not). */
static void vq_interrupts(struct vdev *d, struct vq *q, int on)
{
    if (d->event_idx)
        q->avail[2 + q->size] = on ? q->last_used : (u16)(q->last_used + 0x8000);
    else
        q->avail[0] = on ? 0 : VRING_AVAIL_F_NO_INTERRUPT;
}

/* Make ``head`` available (no notification yet). */
static inline void vq_push(struct vq *q, u16 head)
{
    q->avail[2 + q->avail_idx % q->size] = head;
    q->avail_idx++;
}

/* Publish the pushed heads and notify if the device asked for it. */
static void vq_kick(struct vdev *d, struct vq *q)
{
    __atomic_store_n(&q->avail[1], q->avail_idx, __ATOMIC_RELEASE);
    mb();
    int need;
    if (d->event_idx) {
        u16 ev = *vq_avail_event(q);
        need = (u16)(q->avail_idx - ev - 1) < (u16)(q->avail_idx - q->old_avail);
    } else {
        need = !(*(volatile u16 *)q->used & VRING_USED_F_NO_NOTIFY);
    }
    q->old_avail = q->avail_idx;
    if (!need)
        return;
    q->notifies++;
    if (d->mmio)
        w32(d->regs, M_QNOTIFY, q->index);
    else
        *q->notify = q->index;
}

/* Take one used element if there is one: returns 1 and its id/len. */
static inline int vq_pop(struct vq *q, u32 *id, u32 *len)
{
    u16 u = __atomic_load_n(vq_used_idx(q), __ATOMIC_ACQUIRE);
    if (u == q->last_used)
        return 0;
    if ((u16)(u - q->last_used) > q->size) {
        /* An index behind ours cannot be: the read was wrong. PVM-based
         * nested KVM hosts return such reads (a used index of 0) now and
         * then while the device writes the ring and the host CPUs are
         * busy. Count it and look again. */
        vq_glitches++;
        if (vq_glitches > 1000000)
            vfail(93, "used index stays behind", ((u64)u << 16) | q->last_used);
        return 0;
    }
    volatile struct vused_elem *e =
        (volatile struct vused_elem *)(q->used + 4 + 8ul * (q->last_used % q->size));
    /* The element is read until two reads a moment apart agree, for the
     * same reason (a read may return what the memory held earlier). */
    u32 i0 = e->id, l0 = e->len;
    for (;;) {
        for (int k = 0; k < 64; k++)
            cpu_relax();
        u32 i1 = e->id, l1 = e->len;
        if (i1 == i0 && l1 == l0)
            break;
        vq_glitches++;
        i0 = i1;
        l0 = l1;
    }
    *id = i0;
    *len = l0;
    q->last_used++;
    return 1;
}

/* -- interrupts, checked in the LAPIC IRR ------------------------------------ */

/* PCI: use INTx instead of MSI-X (set before virtio_route_irq) */
static int intx_mode;

static __attribute__((unused)) int lapic_pending(u8 vector)
{
    volatile u32 *irr = (volatile u32 *)(LAPIC_BASE + 0x200 + 0x10ul * (vector / 32));
    /* KVM injects an irqfd's IOAPIC interrupt from a work item: give it
     * a moment rather than read the IRR once. */
    for (u64 t0 = rdtsc(); rdtsc() - t0 < 2600000000ul;) {
        if (*irr >> (vector % 32) & 1)
            return 1;
        for (int k = 0; k < 1000; k++)
            cpu_relax();
    }
    return 0;
}

/* Route the device's interrupt to ``vector`` on APIC 0: MSI-X entry 0 for
 * every queue (PCI; INTx with intx_mode), or the IOAPIC pin, edge,
 * unmasked (MMIO). Call before
 * the queues are set up (PCI) and pass msix=0 to virtio_queue. */
static __attribute__((unused)) void virtio_route_irq(struct vdev *d, u8 vector)
{
    volatile u32 *svr = (volatile u32 *)(LAPIC_BASE + 0xF0);
    *svr = *svr | 0x100;                    /* the local APIC accepts interrupts */
    if (d->mmio) {
        volatile u32 *sel = (volatile u32 *)IOAPIC_BASE;
        volatile u32 *win = (volatile u32 *)(IOAPIC_BASE + 0x10);
        *sel = 0x10 + 2 * (u32)d->irq + 1;
        *win = 0;                           /* destination APIC 0 */
        *sel = 0x10 + 2 * (u32)d->irq;
        *win = vector;                      /* fixed, physical, edge, high, unmasked */
        return;
    }
    if (intx_mode) {
        /* MSI-X stays off: the function's INTx pin, level-triggered, on the
         * IOAPIC input its Interrupt Line names; the ISR read deasserts it. */
        u32 pin = pci_read(d->pci_dev, 0x3C) & 0xFF;
        volatile u32 *sel = (volatile u32 *)IOAPIC_BASE;
        volatile u32 *win = (volatile u32 *)(IOAPIC_BASE + 0x10);
        *sel = 0x10 + 2 * pin + 1;
        *win = 0;
        *sel = 0x10 + 2 * pin;
        *win = vector | (1u << 15);         /* level, active high, unmasked */
        return;
    }
    if (!d->msix_table)
        vfail(7, "no MSI-X table", 0);
    d->msix_table[0] = (u32)LAPIC_BASE;     /* destination APIC 0 */
    d->msix_table[1] = 0;
    d->msix_table[2] = vector;
    d->msix_table[3] = 0;                   /* unmasked */
    for (int cap = (int)(pci_read(d->pci_dev, 0x34) & 0xFF), guard = 0; cap && guard < 48; guard++) {
        u32 h = pci_read(d->pci_dev, cap);
        if ((h & 0xFF) == 0x11) {
            pci_write(d->pci_dev, cap, h | 0x80000000u);   /* MSI-X enable */
            break;
        }
        cap = (int)((h >> 8) & 0xFF);
    }
}

#endif
