/* A freestanding virtio-net driver (virtio-pci or virtio-mmio): one receive
 * and one transmit queue polled from CPL3, no offloads, one descriptor per
 * packet (the 12-byte virtio_net_hdr_v1 in front of the frame).
 *
 * Arguments (key=value, space separated):
 *   mmio=1     use the virtio-mmio device instead of virtio-pci
 *   tx=N       send N frames of ethertype 0x88B5 (default 16): broadcast,
 *              from the device's MAC, the payload a function of the frame's
 *              number (see fill()), sizes from 60 to 1514 bytes
 *   rx=M       then take M frames of ethertype 0x88B6 from the host (default
 *              0): each must carry the pattern of its number, in order; each
 *              is sent back as ethertype 0x88B7 to its sender. Frames of
 *              other types (the host's own IPv6 traffic, say) are skipped.
 *   bench=1    instead: send tx=N frames of size=S bytes (60..1514, default
 *              1514) as fast as the ring takes them, timed with the TSC;
 *              hypercall 0x1411 marks the start, 0x1410 reports (frames,
 *              bytes, cycles, notifications, stale reads)
 * Exit code 0 on success, otherwise the failing step.
 */
#include "virtio.h"

#define PAGE 4096
#define RXQ 0
#define TXQ 1
#define QSIZE 256
#define NBUF 128
#define BUF 2048
#define HDR 12
#define MIN_FRAME 60
#define MAX_FRAME 1514
#define ETH_TX 0x88B5
#define ETH_RX 0x88B6
#define ETH_ECHO 0x88B7
#define F_MAC 5
#define F_STATUS 16
#define HC_RESULT 0x1410
#define HC_START 0x1411

static u8 rx_ring[4 * PAGE] __attribute__((aligned(PAGE)));
static u8 tx_ring[4 * PAGE] __attribute__((aligned(PAGE)));
static u8 rx_bufs[NBUF][BUF] __attribute__((aligned(64)));
static u8 tx_bufs[NBUF][BUF] __attribute__((aligned(64)));
static struct vdev dev;
static struct vq rxq, txq;
static u8 mac[6];
static u16 tx_free[NBUF];
static int ntx_free;

/* The pattern of frame ``seq``: its length (MIN_FRAME..MAX_FRAME) and bytes
 * after the 14-byte Ethernet header: seq, length, then (seq * 7 + i) & 0xFF.
 * The host test computes the same. */
static u32 frame_len(u32 seq) { return MIN_FRAME + (seq * 97u) % (MAX_FRAME - MIN_FRAME + 1); }

static void fill(u8 *frame, u32 seq, u32 len)
{
    u8 *p = frame + 14;
    memcpy(p, &seq, 4);
    memcpy(p + 4, &len, 4);
    for (u32 i = 8; i < len - 14; i++)
        p[i] = (u8)(seq * 7 + i);
}

static int check(const u8 *frame, u32 seq, u32 len)
{
    const u8 *p = frame + 14;
    u32 s, l;
    memcpy(&s, p, 4);
    memcpy(&l, p + 4, 4);
    if (s != seq || l != len)
        return 0;
    for (u32 i = 8; i < len - 14; i++)
        if (p[i] != (u8)(seq * 7 + i))
            return 0;
    return 1;
}

static void eth_header(u8 *frame, const u8 *dst, u16 type)
{
    memcpy(frame, dst, 6);
    memcpy(frame + 6, mac, 6);
    frame[12] = (u8)(type >> 8);
    frame[13] = (u8)type;
}

static void rx_give(u16 i)
{
    rxq.desc[i] = (struct vdesc){ (u64)rx_bufs[i], BUF, VRING_DESC_F_WRITE, 0 };
    vq_push(&rxq, i);
}

static void tx_reap(void)
{
    u32 id, len;
    while (vq_pop(&txq, &id, &len)) {
        if (id >= NBUF)
            vfail(40, "tx used element names no buffer", id);
        tx_free[ntx_free++] = (u16)id;
    }
}

/* A free tx buffer (reaping, spinning while every one is in flight). */
static u16 tx_take(void)
{
    for (u64 spins = 0; !ntx_free; spins++) {
        tx_reap();
        cpu_relax();
        if (spins == 8000000000ul)
            vfail(41, "the device does not return tx buffers", 0);
    }
    return tx_free[--ntx_free];
}

/* Queue buffer ``i`` holding a frame of ``len`` bytes (no kick). */
static void tx_queue(u16 i, u32 len)
{
    memset(tx_bufs[i], 0, HDR);           /* no checksum, no GSO */
    txq.desc[i] = (struct vdesc){ (u64)tx_bufs[i], HDR + len, 0, 0 };
    vq_push(&txq, i);
}

/* Wait for one received packet: its buffer index and frame length. */
static u16 rx_wait(u32 *frame_bytes)
{
    u32 id, len;
    for (u64 spins = 0; !vq_pop(&rxq, &id, &len); spins++) {
        tx_reap();
        cpu_relax();
        if (spins == 8000000000ul)
            vfail(50, "nothing received", 0);
    }
    if (id >= NBUF || len < HDR + 14 || len > BUF)
        vfail(51, "bad rx used element", ((u64)id << 32) | len);
    *frame_bytes = len - HDR;
    return (u16)id;
}

static void rx_done(u16 id)
{
    rx_give(id);
    vq_kick(&dev, &rxq);
}

static void bench(int frames, u32 size)
{
    static const u8 bcast[6] = { 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF };
    for (int i = 0; i < NBUF; i++) {
        eth_header(tx_bufs[i] + HDR, bcast, ETH_TX);
        fill(tx_bufs[i] + HDR, 0, size);
    }
    rt_hypercall(HC_START, 0, 0, 0, 0, 0, 0);
    u64 notifies0 = txq.notifies;
    u64 t0 = rdtsc();
    int sent = 0;
    while (sent < frames) {
        tx_reap();
        int batch = 0;
        while (ntx_free && sent < frames) {
            u16 i = tx_free[--ntx_free];
            u32 seq = (u32)sent;
            memcpy(tx_bufs[i] + HDR + 14, &seq, 4);
            tx_queue(i, size);
            sent++;
            batch++;
        }
        if (batch)
            vq_kick(&dev, &txq);
        else
            cpu_relax();
    }
    for (u64 spins = 0; ntx_free < NBUF; spins++) {     /* every frame is on the tap */
        tx_reap();
        cpu_relax();
        if (spins == 8000000000ul)
            vfail(42, "the device does not finish sending", (u64)ntx_free);
    }
    u64 cycles = rdtsc() - t0;
    u64 notifies = txq.notifies - notifies0;
    rt_printf("virtio-net: %d frames of %u bytes in %lu cycles, %lu notifications, "
              "%lu stale reads\n", frames, size, cycles, notifies, vq_glitches);
    rt_hypercall(HC_RESULT, (u64)frames, (u64)frames * size, cycles, notifies, vq_glitches, 0);
}

int main(int cpu, int ncpus, const char *args)
{
    (void)ncpus;
    if (cpu != 0)
        return 0;
    int use_mmio = rt_arg_int(args, "mmio", 0);
    int ntx = rt_arg_int(args, "tx", 16);
    int nrx = rt_arg_int(args, "rx", 0);
    int is_bench = rt_arg_int(args, "bench", 0);
    int size = rt_arg_int(args, "size", MAX_FRAME);
    if (ntx < 0 || nrx < 0 || size < MIN_FRAME || size > MAX_FRAME)
        vfail(9, "bad arguments", 0);
    if (!(use_mmio ? virtio_find_mmio(&dev, 1) : virtio_find_pci(&dev, 1)))
        vfail(1, "no virtio-net device", 0);
    virtio_init(&dev, (1ul << F_MAC) | (1ul << F_STATUS));
    if (!(dev.features >> F_MAC & 1))
        vfail(8, "the device gives no MAC", dev.features);
    for (int i = 0; i < 6; i++)
        mac[i] = r8(dev.devcfg, (u32)i);
    u16 link = r16(dev.devcfg, 6);
    virtio_queue(&dev, &rxq, RXQ, QSIZE, rx_ring, 0xFFFF);
    virtio_queue(&dev, &txq, TXQ, QSIZE, tx_ring, 0xFFFF);
    vq_interrupts(&dev, &rxq, 0);
    vq_interrupts(&dev, &txq, 0);
    virtio_driver_ok(&dev);
    for (u16 i = 0; i < NBUF; i++)
        rx_give(i);
    vq_kick(&dev, &rxq);
    for (u16 i = 0; i < NBUF; i++)
        tx_free[ntx_free++] = i;
    char text[18];
    for (int i = 0; i < 6; i++) {
        text[3 * i] = "0123456789abcdef"[mac[i] >> 4];
        text[3 * i + 1] = "0123456789abcdef"[mac[i] & 15];
        text[3 * i + 2] = i < 5 ? ':' : 0;
    }
    rt_printf("virtio-net: %s link %s over %s\n", text, link & 1 ? "up" : "down",
              use_mmio ? "virtio-mmio" : "virtio-pci");

    if (is_bench) {
        bench(ntx, (u32)size);
        rt_puts("virtio-net: ok\n");
        return 0;
    }

    static const u8 bcast[6] = { 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF };
    for (int s = 0; s < ntx; s++) {
        u16 i = tx_take();
        u32 len = frame_len((u32)s);
        eth_header(tx_bufs[i] + HDR, bcast, ETH_TX);
        fill(tx_bufs[i] + HDR, (u32)s, len);
        tx_queue(i, len);
        vq_kick(&dev, &txq);
    }
    int got = 0, skipped = 0;
    while (got < nrx) {
        u32 len;
        u16 id = rx_wait(&len);
        u8 *frame = rx_bufs[id] + HDR;
        u16 type = (u16)(frame[12] << 8 | frame[13]);
        if (type != ETH_RX) {
            skipped++;
            rx_done(id);
            continue;
        }
        if (len < 22 || !check(frame, (u32)got, len))
            vfail(52, "frame from the host does not carry its pattern", (u64)got);
        u16 t = tx_take();
        eth_header(tx_bufs[t] + HDR, frame + 6, ETH_ECHO);
        memcpy(tx_bufs[t] + HDR + 14, frame + 14, len - 14);
        rx_done(id);
        tx_queue(t, len);
        vq_kick(&dev, &txq);
        got++;
    }
    for (u64 spins = 0; ntx_free < NBUF; spins++) {
        tx_reap();
        cpu_relax();
        if (spins == 8000000000ul)
            vfail(43, "the device does not finish sending", (u64)ntx_free);
    }
    rt_printf("virtio-net: sent %d frames, %d from the host checked and echoed, %d others "
              "skipped, %lu stale reads\n", ntx, got, skipped, vq_glitches);
    rt_puts("virtio-net: ok\n");
    return 0;
}
