/* A freestanding virtio-console driver (virtio-pci or virtio-mmio): the
 * guest greets the host on port 0, then echoes every line the host types
 * ("echo: <line>") until the line "quit". No exit per byte: a line is one
 * buffer on the transmit queue, and a notification only when the device
 * asks for one.
 *
 * Arguments: mmio=1 (use virtio-mmio). Exit code 0 on "quit".
 */
#include "virtio.h"

#define PAGE 4096
#define RXQ 0
#define TXQ 1
#define NRX 8
#define RX_BUF 256
#define LINE 512

static u8 rx_ring[4 * PAGE] __attribute__((aligned(PAGE)));
static u8 tx_ring[4 * PAGE] __attribute__((aligned(PAGE)));
static u8 rx_bufs[NRX][RX_BUF];
static char tx_buf[LINE + 16];
static struct vdev dev;
static struct vq rxq, txq;

static void put(const char *s, u32 n)
{
    memcpy(tx_buf, s, n);
    txq.desc[0] = (struct vdesc){ (u64)tx_buf, n, 0, 0 };
    vq_push(&txq, 0);
    vq_kick(&dev, &txq);
    u32 id, len;
    while (!vq_pop(&txq, &id, &len))      /* one buffer: wait until it is sent */
        cpu_relax();
}

int main(int cpu, int ncpus, const char *args)
{
    (void)ncpus;
    if (cpu != 0)
        return 0;
    int use_mmio = rt_arg_int(args, "mmio", 0);
    if (!(use_mmio ? virtio_find_mmio(&dev, 3) : virtio_find_pci(&dev, 3)))
        vfail(1, "no virtio-console device", 0);
    virtio_init(&dev, 0);
    virtio_queue(&dev, &rxq, RXQ, 16, rx_ring, 0xFFFF);
    virtio_queue(&dev, &txq, TXQ, 16, tx_ring, 0xFFFF);
    vq_interrupts(&dev, &rxq, 0);
    vq_interrupts(&dev, &txq, 0);
    virtio_driver_ok(&dev);
    for (u16 i = 0; i < NRX; i++) {
        rxq.desc[i] = (struct vdesc){ (u64)rx_bufs[i], RX_BUF, VRING_DESC_F_WRITE, 0 };
        vq_push(&rxq, i);
    }
    vq_kick(&dev, &rxq);
    static const char hello[] = "hello from the guest over virtio-console\n";
    put(hello, sizeof(hello) - 1);

    static char line[LINE];
    u32 n = 0;
    for (;;) {
        u32 id, len;
        while (!vq_pop(&rxq, &id, &len))
            cpu_relax();
        if (id >= NRX || len > RX_BUF)
            vfail(10, "bad rx used element", ((u64)id << 32) | len);
        for (u32 i = 0; i < len; i++) {
            char c = (char)rx_bufs[id][i];
            if (c != '\n') {
                if (n < LINE - 1)
                    line[n++] = c;
                continue;
            }
            line[n] = 0;
            if (n == 4 && !rt_strncmp(line, "quit", 4)) {
                put("bye\n", 4);
                return 0;
            }
            static char out[LINE + 16];
            memcpy(out, "echo: ", 6);
            memcpy(out + 6, line, n);
            out[6 + n] = '\n';
            put(out, 7 + n);
            n = 0;
        }
        rxq.desc[id] = (struct vdesc){ (u64)rx_bufs[id], RX_BUF, VRING_DESC_F_WRITE, 0 };
        vq_push(&rxq, (u16)id);
        vq_kick(&dev, &rxq);
    }
}
