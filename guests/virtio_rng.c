/* A freestanding virtio-rng driver over virtio-pci or virtio-mmio: asks
 * the device for random bytes and reports them to the host, which checks
 * they are not all the same.
 *
 * Arguments: mmio=1 (use virtio-mmio), bytes=N (per request, 1..4096,
 * default 64), rounds=N (default 4), irq=1 (ask for interrupts and check
 * one is pending in the local APIC afterwards).
 * Hypercall 0x1402 reports (address, length) of all the bytes received.
 */
#include "virtio.h"

#define PAGE 4096
#define HC_RNG 0x1402
#define MAX_ROUNDS 16
#define IRQ_VECTOR 0x41

static u8 ring_mem[4 * PAGE] __attribute__((aligned(PAGE)));
static u8 pool[MAX_ROUNDS * PAGE] __attribute__((aligned(PAGE)));
static struct vdev dev;
static struct vq q;

int main(int cpu, int ncpus, const char *args)
{
    (void)ncpus;
    if (cpu != 0)
        return 0;
    int use_mmio = rt_arg_int(args, "mmio", 0);
    int want_irq = rt_arg_int(args, "irq", 0);
    int bytes = rt_arg_int(args, "bytes", 64);
    int rounds = rt_arg_int(args, "rounds", 4);
    if (bytes < 1 || bytes > PAGE || rounds < 1 || rounds > MAX_ROUNDS)
        vfail(1, "bytes or rounds out of range", (u64)bytes);
    if (!(use_mmio ? virtio_find_mmio(&dev, 4) : virtio_find_pci(&dev, 4)))
        vfail(1, use_mmio ? "no virtio-rng on virtio-mmio" : "no virtio-rng on PCI bus 0", 0);
    virtio_init(&dev, 0);
    if (want_irq)
        virtio_route_irq(&dev, IRQ_VECTOR);
    virtio_queue(&dev, &q, 0, 16, ring_mem, want_irq && !dev.mmio ? 0 : 0xFFFF);
    vq_interrupts(&dev, &q, want_irq);
    virtio_driver_ok(&dev);

    u64 total = 0;
    for (int r = 0; r < rounds; r++) {
        u8 *buf = pool + (u64)r * PAGE;
        q.desc[0] = (struct vdesc){ (u64)buf, (u32)bytes, VRING_DESC_F_WRITE, 0 };
        vq_push(&q, 0);
        vq_kick(&dev, &q);
        u32 id, len;
        u64 spins = 0;
        while (!vq_pop(&q, &id, &len)) {
            cpu_relax();
            if (++spins == 4000000000ul)
                vfail(90, "no answer from the device", (u64)r);
        }
        if (id != 0 || len == 0 || len > (u32)bytes)
            vfail(10, "bad used element", ((u64)id << 32) | len);
        memcpy(pool + total, buf, len);     /* pack what arrived */
        total += len;
    }
    rt_printf("virtio-rng: %lu bytes from %s\n", total, use_mmio ? "virtio-mmio" : "virtio-pci");
    rt_hypercall(HC_RNG, (u64)pool, total, 0, 0, 0, 0);
    if (want_irq) {
        if (!lapic_pending(IRQ_VECTOR))
            vfail(30, "no interrupt pending in the local APIC", IRQ_VECTOR);
        rt_puts("virtio-rng: interrupt delivered\n");
    }
    rt_puts("virtio-rng: ok\n");
    return 0;
}
