/* A freestanding virtio-vsock driver (virtio-pci or virtio-mmio): one
 * stream connection, polled from CPL3, with credit accounting.
 *
 * Arguments:
 *   mmio=1     use the virtio-mmio device
 *   port=P     connect to the host (CID 2) port P (default 1234), send
 *              rounds messages "ping <i>", expect each back from the host
 *              (which answers in upper case: "PING <i>"), then shut down
 *   listen=P   instead, accept a connection from the host to port P, echo
 *              every message back until the host shuts its side
 *   rounds=N   messages to send in connect mode (default 8)
 *   bench=1    with port=P: the benchmark instead (see bench()): rounds
 *              round trips of msg=M bytes (default 64), then bytes=B
 *              (default 1 MiB) guest->host and B host->guest in chunks of
 *              chunk=C bytes (default 4096), timed with the TSC; hypercall
 *              0x1421 marks the start, 0x1420 reports the phases' cycles
 * Exit code 0 on success, otherwise the failing step.
 */
#include "virtio.h"

#define PAGE 4096
#define RXQ 0
#define TXQ 1
#define EVQ 2
#define NRX 32
#define NTX 32
#define RX_BUF (44 + PAGE)
#define BUF_ALLOC (NRX * PAGE)

#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define HC_RESULT 0x1420
#define HC_START 0x1421

struct hdr {
    u64 src_cid, dst_cid;
    u32 src_port, dst_port, len;
    u16 type, op;
    u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

static u8 rx_ring[4 * PAGE] __attribute__((aligned(PAGE)));
static u8 tx_ring[4 * PAGE] __attribute__((aligned(PAGE)));
static u8 ev_ring[4 * PAGE] __attribute__((aligned(PAGE)));
static u8 rx_bufs[NRX][RX_BUF] __attribute__((aligned(16)));
static u8 tx_bufs[NTX][RX_BUF] __attribute__((aligned(16)));
static u8 ev_bufs[4][8];
static struct vdev dev;
static struct vq rxq, txq, evq;
static u64 guest_cid;
static u32 local_port, peer_port, fwd_cnt;
static u16 tx_free[NTX];
static int ntx_free;
/* the host's credit (from every packet it sends) and what we sent it */
static u32 peer_buf_alloc, peer_fwd_cnt, tx_cnt;

/* Copies with one rep movsb (the runtime's memcpy moves a byte per loop). */
static inline void copy(void *d, const void *s, u64 n)
{
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) :: "memory");
}

static void rx_give(u16 i)
{
    rxq.desc[i] = (struct vdesc){ (u64)rx_bufs[i], RX_BUF, VRING_DESC_F_WRITE, 0 };
    vq_push(&rxq, i);
}

/* Reclaim finished tx buffers. */
static void tx_reap(void)
{
    u32 id, len;
    while (vq_pop(&txq, &id, &len)) {
        if (id >= NTX)
            vfail(40, "tx used element names no buffer", id);
        tx_free[ntx_free++] = (u16)id;
    }
}

/* Buffers given back since the last kick: the device hears of them in
 * batches (as Linux refills its rx ring), before a packet is sent (so one
 * wake-up of the device sees both), or when the driver waits. */
static int rx_unkicked;

static void send(u16 op, u32 flags, const void *data, u32 len)
{
    while (!ntx_free) {
        tx_reap();
        cpu_relax();
    }
    u16 i = tx_free[--ntx_free];
    struct hdr *h = (struct hdr *)tx_bufs[i];
    *h = (struct hdr){ guest_cid, 2, local_port, peer_port, len, 1, op, flags, BUF_ALLOC, fwd_cnt };
    if (len)
        copy(tx_bufs[i] + sizeof(*h), data, len);
    txq.desc[i] = (struct vdesc){ (u64)tx_bufs[i], (u32)sizeof(*h) + len, 0, 0 };
    vq_push(&txq, i);
    if (rx_unkicked) {
        vq_kick(&dev, &rxq);
        rx_unkicked = 0;
    }
    vq_kick(&dev, &txq);
}

/* Wait for the next packet; copies its header, returns the rx buffer index. */
static u16 recv(struct hdr *out)
{
    u32 id, len;
    u64 spins = 0;
    while (!vq_pop(&rxq, &id, &len)) {
        if (rx_unkicked) {              /* nothing to read: hand back what we have */
            vq_kick(&dev, &rxq);
            rx_unkicked = 0;
        }
        tx_reap();
        cpu_relax();
        if (++spins == 8000000000ul)
            vfail(41, "nothing received", 0);
    }
    if (id >= NRX || len < sizeof(struct hdr) || len > RX_BUF)
        vfail(42, "bad rx used element", ((u64)id << 32) | len);
    memcpy(out, rx_bufs[id], sizeof(*out));
    if (out->len > len - sizeof(struct hdr))
        vfail(43, "packet longer than its buffer", out->len);
    if (out->src_port == peer_port && out->dst_port == local_port) {
        peer_buf_alloc = out->buf_alloc;
        peer_fwd_cnt = out->fwd_cnt;
    }
    return (u16)id;
}

static void rx_done(u16 id)
{
    rx_give(id);
    if (++rx_unkicked >= NRX / 4) {
        vq_kick(&dev, &rxq);
        rx_unkicked = 0;
    }
}

static int same(const u8 *a, const char *b, u32 n)
{
    for (u32 i = 0; i < n; i++)
        if (a[i] != (u8)b[i])
            return 0;
    return b[n] == 0;
}

static u32 fmt_msg(char *out, const char *word, int i)
{
    u32 n = 0;
    while (*word)
        out[n++] = *word++;
    out[n++] = ' ';
    char digits[12];
    int k = 0;
    do {
        digits[k++] = (char)('0' + i % 10);
        i /= 10;
    } while (i);
    while (k)
        out[n++] = digits[--k];
    out[n] = 0;
    return n;
}

/* The benchmark's streams: the byte at offset o is o % 251, so the bytes
 * from offset o are pattern + o % 251 (filled once in bench()). */
#define PERIOD 251
static u8 pattern[PAGE + PERIOD];

/* Whether n bytes at a and b agree, eight at a time. */
static int equal(const u8 *a, const u8 *b, u32 n)
{
    u32 i = 0;
    for (; i + 8 <= n; i += 8) {
        u64 x, y;
        __builtin_memcpy(&x, a + i, 8);
        __builtin_memcpy(&y, b + i, 8);
        if (x != y)
            return 0;
    }
    for (; i < n; i++)
        if (a[i] != b[i])
            return 0;
    return 1;
}

/* Take one packet of the connection: a data packet's payload is copied to
 * ``dst`` (at most ``room`` bytes, or the benchmark fails); control packets
 * are answered. Returns the payload length. */
static u32 bench_recv(u8 *dst, u32 room)
{
    struct hdr h;
    for (;;) {
        u16 id = recv(&h);
        if (h.src_port != peer_port || h.dst_port != local_port) {
            rx_done(id);
            continue;
        }
        if (h.op == OP_RW) {
            if (h.len > room)
                vfail(61, "more data than expected", h.len);
            copy(dst, rx_bufs[id] + sizeof(h), h.len);
            fwd_cnt += h.len;
            rx_done(id);
            return h.len;
        }
        if (h.op == OP_CREDIT_REQUEST)
            send(OP_CREDIT_UPDATE, 0, 0, 0);
        else if (h.op != OP_CREDIT_UPDATE)
            vfail(62, "connection lost", h.op);
        rx_done(id);
        return 0;
    }
}

/* Send ``n`` bytes as data packets of at most ``chunk``, within the host's credit. */
static void bench_send(const u8 *data, u32 n, u32 chunk)
{
    u8 sink[1];
    while (n) {
        u32 credit = peer_buf_alloc - (tx_cnt - peer_fwd_cnt);
        if (credit > peer_buf_alloc)
            credit = 0;
        if (!credit) {
            bench_recv(sink, 0);        /* a credit update (data now fails) */
            continue;
        }
        u32 k = n < chunk ? n : chunk;
        if (k > credit)
            k = credit;
        send(OP_RW, 0, data, k);
        tx_cnt += k;
        data += k;
        n -= k;
    }
}

/* Round trips of ``msg`` bytes, then ``total`` bytes each way. The host
 * echoes the round trips, answers the guest's stream with one byte 'K'
 * once it has all of it, and sends its own stream when the guest says 'G'. */
static void bench(int rounds, u32 msg, u64 total, u32 chunk)
{
    static u8 out[PAGE], in[PAGE];
    for (u32 i = 0; i < sizeof(pattern); i++)
        pattern[i] = (u8)(i % PERIOD);
    rt_hypercall(HC_START, 0, 0, 0, 0, 0, 0);
    u64 t0 = rdtsc();
    for (int i = 0; i < rounds; i++) {
        for (u32 k = 0; k < msg; k++)
            out[k] = (u8)(i + k);
        bench_send(out, msg, chunk);
        for (u32 got = 0; got < msg;)
            got += bench_recv(in + got, msg - got);
        for (u32 k = 0; k < msg; k++)
            if (in[k] != (u8)(i + k))
                vfail(63, "round trip came back wrong", (u64)i);
    }
    u64 t1 = rdtsc();
    for (u64 o = 0; o < total;) {
        u32 k = total - o < PAGE ? (u32)(total - o) : PAGE;
        bench_send(pattern + o % PERIOD, k, chunk);
        o += k;
    }
    u8 ack = 0;
    while (!bench_recv(&ack, 1))
        ;
    if (ack != 'K')
        vfail(64, "no acknowledgement of the stream", ack);
    u64 t2 = rdtsc();
    out[0] = 'G';                       /* the host streams once told to */
    bench_send(out, 1, chunk);
    u32 credited = fwd_cnt;
    for (u64 o = 0; o < total;) {
        u32 n = bench_recv(in, PAGE);
        if (o + n > total || !equal(in, pattern + o % PERIOD, n))
            vfail(65, "host stream data wrong after", o);
        o += n;
        if (fwd_cnt - credited >= BUF_ALLOC / 4) {
            send(OP_CREDIT_UPDATE, 0, 0, 0);
            credited = fwd_cnt;
        }
    }
    u64 t3 = rdtsc();
    rt_printf("virtio-vsock: %d round trips of %u bytes in %lu cycles, %lu bytes out in %lu, "
              "in in %lu, %lu stale reads\n", rounds, msg, t1 - t0, total, t2 - t1, t3 - t2,
              vq_glitches);
    rt_hypercall(HC_RESULT, (u64)rounds | (u64)msg << 32, total, t1 - t0, t2 - t1, t3 - t2,
                 txq.notifies + rxq.notifies);
}

int main(int cpu, int ncpus, const char *args)
{
    (void)ncpus;
    if (cpu != 0)
        return 0;
    int use_mmio = rt_arg_int(args, "mmio", 0);
    int port = rt_arg_int(args, "port", 1234);
    int listen = rt_arg_int(args, "listen", 0);
    int rounds = rt_arg_int(args, "rounds", 8);
    int is_bench = rt_arg_int(args, "bench", 0);
    int msg_len = rt_arg_int(args, "msg", 64);
    int total = rt_arg_int(args, "bytes", 1 << 20);
    int chunk = rt_arg_int(args, "chunk", PAGE);
    if (rounds < 0 || msg_len < 1 || msg_len > PAGE || total < 0 || chunk < 1 || chunk > PAGE)
        vfail(9, "bad arguments", 0);
    if (!(use_mmio ? virtio_find_mmio(&dev, 19) : virtio_find_pci(&dev, 19)))
        vfail(1, "no virtio-vsock device", 0);
    virtio_init(&dev, 0);
    guest_cid = *(volatile u64 *)dev.devcfg;
    virtio_queue(&dev, &rxq, RXQ, 64, rx_ring, 0xFFFF);
    virtio_queue(&dev, &txq, TXQ, 64, tx_ring, 0xFFFF);
    virtio_queue(&dev, &evq, EVQ, 4, ev_ring, 0xFFFF);
    vq_interrupts(&dev, &rxq, 0);
    vq_interrupts(&dev, &txq, 0);
    vq_interrupts(&dev, &evq, 0);
    virtio_driver_ok(&dev);
    for (u16 i = 0; i < NRX; i++)
        rx_give(i);
    vq_kick(&dev, &rxq);
    for (u16 i = 0; i < 4; i++) {
        evq.desc[i] = (struct vdesc){ (u64)ev_bufs[i], 8, VRING_DESC_F_WRITE, 0 };
        vq_push(&evq, i);
    }
    vq_kick(&dev, &evq);
    for (u16 i = 0; i < NTX; i++)
        tx_free[ntx_free++] = i;
    rt_printf("virtio-vsock: guest CID %lu over %s\n", guest_cid,
              use_mmio ? "virtio-mmio" : "virtio-pci");

    struct hdr h;
    char msg[32], want[32];
    if (!listen) {
        local_port = 5000;
        peer_port = (u32)port;
        send(OP_REQUEST, 0, 0, 0);
        u16 id = recv(&h);
        if (h.op != OP_RESPONSE || h.src_port != peer_port || h.dst_port != local_port)
            vfail(10, "connection refused", ((u64)h.op << 32) | h.src_port);
        rx_done(id);
        if (is_bench) {
            bench(rounds, (u32)msg_len, (u64)total, (u32)chunk);
            rounds = 0;
        }
        for (int i = 0; i < rounds; i++) {
            u32 n = fmt_msg(msg, "ping", i);
            send(OP_RW, 0, msg, n);
            fmt_msg(want, "PING", i);
            u32 got = 0;
            while (got < n) {           /* the host may answer in pieces */
                id = recv(&h);
                if (h.op == OP_CREDIT_UPDATE || h.op == OP_CREDIT_REQUEST) {
                    if (h.op == OP_CREDIT_REQUEST)
                        send(OP_CREDIT_UPDATE, 0, 0, 0);
                    rx_done(id);
                    continue;
                }
                if (h.op != OP_RW || got + h.len > n)
                    vfail(11, "unexpected packet", ((u64)h.op << 32) | h.len);
                memcpy(msg + got, rx_bufs[id] + sizeof(h), h.len);
                got += h.len;
                fwd_cnt += h.len;
                rx_done(id);
            }
            if (!same((u8 *)msg, want, n))
                vfail(12, "wrong answer", (u64)i);
        }
        send(OP_SHUTDOWN, 3, 0, 0);
        for (;;) {                      /* the host resets the closed connection */
            u16 id = recv(&h);
            rx_done(id);
            if (h.op == OP_RST)
                break;
        }
        rt_printf("virtio-vsock: %d messages echoed by the host\n", rounds);
    } else {
        int echoed = 0;
        for (;;) {
            u16 id = recv(&h);
            if (h.op == OP_REQUEST && h.dst_port == (u32)listen && !peer_port) {
                local_port = h.dst_port;
                peer_port = h.src_port;
                rx_done(id);
                send(OP_RESPONSE, 0, 0, 0);
                continue;
            }
            if (h.src_port != peer_port || h.dst_port != local_port) {
                rx_done(id);
                continue;
            }
            if (h.op == OP_RW) {
                u32 n = h.len;
                static u8 data[PAGE];
                memcpy(data, rx_bufs[id] + sizeof(h), n);
                fwd_cnt += n;
                rx_done(id);
                send(OP_RW, 0, data, n);
                echoed += (int)n;
            } else if (h.op == OP_SHUTDOWN || h.op == OP_RST) {
                rx_done(id);
                if (h.op == OP_SHUTDOWN)
                    send(OP_RST, 0, 0, 0);
                break;
            } else {
                if (h.op == OP_CREDIT_REQUEST)
                    send(OP_CREDIT_UPDATE, 0, 0, 0);
                rx_done(id);
            }
        }
        rt_printf("virtio-vsock: echoed %d bytes to the host\n", echoed);
    }
    tx_reap();
    rt_puts("virtio-vsock: ok\n");
    return 0;
}
