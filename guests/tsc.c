/* Guest time probe: what rate does this guest's TSC run at, and how many
 * timer interrupts does it receive, measured from inside the guest.
 *
 * The host gives a reference through a hypercall (HC_HOST_NS below) that
 * returns its CLOCK_MONOTONIC in ns. Each reference read is bracketed by two
 * RDTSCs and paired with their midpoint, so the exit's own cost (~56 us at
 * CPL3 on nested hosts) cancels out.
 *
 * Arguments:
 *   mode=rate ms=<window> exits=<0|1>
 *       prints the frequency CPUID advertises (leaves 0x15, 0x16,
 *       0x40000010) and "rate: cycles=C host_ns=N" over a window of <ms>.
 *       With exits=1 the loop takes a port exit every ~100 us, so a host in
 *       TSC catch-up mode gets its chances to step the TSC.
 *   mode=ticks src=<pit|host|none> hz=<rate> irq=<line> ms=<window>
 *              blackout_ms=<no-exit section> settle_ms=<before it> win_ms=<bucket>
 *       routes the timer through the 8259 PIC (auto-EOI, vectors 32..47),
 *       programs PIT channel 0 at <hz> (src=pit) or unmasks <irq> for a
 *       host-driven tick (src=host), enables interrupts and counts them over
 *       <ms> (src=none: no timer, the baseline for the gap count). Optionally spends <blackout_ms> with interrupts off (code that
 *       takes no exits), then prints
 *       "ticks: n=... ns=... blackout_ns=... during_blackout=... gaps=... stolen=..."
 *       and the count per <win_ms> bucket. gaps counts the times the vCPU
 *       left guest mode (a jump of more than gap_ns between two RDTSCs),
 *       stolen the cycles those took.
 */
#include "runtime/hvkit.h"

#define HC_HOST_NS 0x1154
#define HC_TICKS_READY 0x1155   /* "about to take interrupts": a host ticker starts now */
#define PIT_HZ 1193182
#define MAX_WIN 64
#define NULL_PORT 0x80   /* POST port: served in C by the VMM */
#define KCALL_CPUID (KCALL_USER + 0)
#define KCALL_SET_IF (KCALL_USER + 1)

extern volatile u64 rt_irq_count;

struct ref {
    u64 tsc;
    u64 ns;
};

static struct ref reference(void)
{
    u64 a = rdtsc();
    u64 ns = (u64)rt_hypercall(HC_HOST_NS, 0, 0, 0, 0, 0, 0);
    u64 b = rdtsc();
    struct ref r = { a + (b - a) / 2, ns };
    return r;
}

/* CPUID at CPL3 runs natively on nested hosts (the host CPU answers);
 * at CPL0 KVM answers from the vCPU's table, which is what we want. */
static u64 kc_cpuid(u64 leaf, u64 reg)
{
    u32 r[4];
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3])
                     : "a"((u32)leaf), "c"(0));
    return r[reg & 3];
}

static void vcpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
    *a = (u32)rt_kcall(KCALL_CPUID, leaf, 0);
    *b = (u32)rt_kcall(KCALL_CPUID, leaf, 1);
    *c = (u32)rt_kcall(KCALL_CPUID, leaf, 2);
    *d = (u32)rt_kcall(KCALL_CPUID, leaf, 3);
}

struct desc_ptr {
    u16 limit;
    u64 base;
} __attribute__((packed));

/* Set or clear IF in the interrupted CPL3 frame of this kernel call. An
 * interrupt's iretq can leave CPL3 with IOPL 0 on nested hosts, after which
 * sti/cli #GP; the frame's IF is honoured. The frame sits at the top of
 * the kernel stack (TSS.RSP0): ss, rsp, rflags, cs, rip. */
static u64 kc_set_if(u64 on, u64 unused)
{
    (void)unused;
    struct desc_ptr gdt;
    u16 tr;
    __asm__ volatile("sgdt %0; str %1" : "=m"(gdt), "=r"(tr));
    u64 *d = (u64 *)(gdt.base + (tr & ~7u));
    u64 base = ((d[0] >> 16) & 0xFFFFFF) | (((d[0] >> 56) & 0xFF) << 24) | (d[1] << 32);
    u64 rsp0 = *(u64 *)(base + 4);
    u64 *rflags = (u64 *)(rsp0 - 24);
    if (on)
        *rflags |= 1ul << 9;
    else
        *rflags &= ~(1ul << 9);
    return 0;
}

static u64 cpuid_khz(void)
{
    u32 a, b, c, d;
    vcpuid(0x40000000, &a, &b, &c, &d);
    if (a >= 0x40000010) {
        vcpuid(0x40000010, &a, &b, &c, &d);
        if (a)
            return a;
    }
    vcpuid(0, &a, &b, &c, &d);
    if (a >= 0x15) {
        vcpuid(0x15, &a, &b, &c, &d);
        if (a && b && c)
            return (u64)c * b / a / 1000;
    }
    return 0;
}

static void print_cpuid(void)
{
    u32 a, b, c, d, max, hvmax;
    vcpuid(0, &max, &b, &c, &d);
    vcpuid(0x40000000, &hvmax, &b, &c, &d);
    u32 c15a = 0, c15b = 0, c15c = 0, c16 = 0, t10 = 0, t10bus = 0;
    if (max >= 0x15)
        vcpuid(0x15, &c15a, &c15b, &c15c, &d);
    if (max >= 0x16)
        vcpuid(0x16, &c16, &b, &c, &d);
    if (hvmax >= 0x40000010)
        vcpuid(0x40000010, &t10, &t10bus, &c, &d);
    (void)a;
    rt_printf("cpuid: leaf15=%u/%u*%u leaf16_mhz=%u leaf40000010_khz=%u apic_bus_khz=%u "
              "khz=%lu\n", c15b, c15a, c15c, c16, t10, t10bus, cpuid_khz());
}

/* Spin for ~ns using the TSC at khz; with exits, touch a null port every
 * ~100 us so the vCPU re-enters often. */
static void spin_ns(u64 ns, u64 khz, int exits)
{
    u64 cycles = ns * khz / 1000000, step = khz / 10, t0 = rdtsc(), next = t0 + step;
    for (;;) {
        u64 t = rdtsc();
        if (t - t0 >= cycles)
            break;
        if (exits && (s64)(t - next) >= 0) {
            outb(NULL_PORT, 0);
            next = t + step;
        }
        cpu_relax();
    }
}

static u64 calibrate(u64 ms)
{
    struct ref r0 = reference();
    u64 khz = cpuid_khz();
    spin_ns(ms * 1000000, khz ? khz : 1000000, 0);
    struct ref r1 = reference();
    u64 ns = r1.ns - r0.ns;
    return ns ? (r1.tsc - r0.tsc) * 1000000 / ns : 0;
}

static int mode_rate(const char *args)
{
    u64 ms = (u64)rt_arg_int(args, "ms", 500);
    int exits = rt_arg_int(args, "exits", 0);
    print_cpuid();
    u64 khz = cpuid_khz();
    struct ref r0 = reference();
    spin_ns(ms * 1000000, khz ? khz : 1000000, exits);
    struct ref r1 = reference();
    rt_printf("rate: cycles=%lu host_ns=%lu exits=%d\n", r1.tsc - r0.tsc, r1.ns - r0.ns, exits);
    return 0;
}

static void pic_init(u8 unmask_irq)
{
    /* ICW1 edge, cascade, ICW4; ICW2 vector base; ICW3 wiring; ICW4 8086 + auto-EOI
     * (the runtime's handler only EOIs the LAPIC). */
    outb(0x20, 0x11); outb(0x21, 32); outb(0x21, 0x04); outb(0x21, 0x03);
    outb(0xA0, 0x11); outb(0xA1, 40); outb(0xA1, 0x02); outb(0xA1, 0x03);
    if (unmask_irq < 8) {
        outb(0x21, (u8)~(1u << unmask_irq));
        outb(0xA1, 0xFF);
    } else {
        outb(0x21, (u8)~(1u << 2));
        outb(0xA1, (u8)~(1u << (unmask_irq - 8)));
    }
}

static void pit_start(u32 hz)
{
    u32 div = (PIT_HZ + hz / 2) / hz;
    if (div > 0xFFFF)
        div = 0;   /* 65536 */
    outb(0x43, 0x34);   /* channel 0, lobyte/hibyte, mode 2 (rate generator) */
    outb(0x40, div & 0xFF);
    outb(0x40, (div >> 8) & 0xFF);
}

static void irq_on(void) { rt_kcall(KCALL_SET_IF, 1, 0); }
static void irq_off(void) { rt_kcall(KCALL_SET_IF, 0, 0); }

static int mode_ticks(const char *args)
{
    char src_host = 0, src_none = 0;
    for (const char *p = args; *p; p++) {
        if (!rt_strncmp(p, "src=host", 8))
            src_host = 1;
        if (!rt_strncmp(p, "src=none", 8))
            src_none = 1;
    }
    u32 hz = (u32)rt_arg_int(args, "hz", 100);
    u8 irq = (u8)rt_arg_int(args, "irq", 5);
    u64 ms = (u64)rt_arg_int(args, "ms", 2000);
    u64 blackout_ms = (u64)rt_arg_int(args, "blackout_ms", 0);
    u64 settle_ms = (u64)rt_arg_int(args, "settle_ms", 200);
    u64 win_ms = (u64)rt_arg_int(args, "win_ms", 250);
    u64 gap_ns = (u64)rt_arg_int(args, "gap_ns", 2000);
    if (irq > 15 || irq == 2 || hz == 0 || win_ms == 0) {
        rt_printf("error: bad arguments (irq %u, hz %u, win_ms %lu)\n", irq, hz, win_ms);
        return 2;
    }

    u64 khz = calibrate(100);
    rt_printf("calibrated: khz=%lu cpuid_khz=%lu\n", khz, cpuid_khz());
    pic_init(src_host ? irq : 0);
    if (src_none)
        outb(0x21, 0xFF);
    else if (!src_host)
        pit_start(hz);
    rt_hypercall(HC_TICKS_READY, hz, irq, 0, 0, 0, 0);
    irq_on();
    /* Wait for the first tick so the window starts on the timer's phase. */
    u64 start = rdtsc();
    while (!src_none && rt_irq_count == 0 && rdtsc() - start < khz * 2000)
        cpu_relax();
    if (!src_none && rt_irq_count == 0) {
        rt_printf("error: no timer interrupt within 2 s\n");
        return 3;
    }

    u64 win[MAX_WIN] = { 0 };
    u64 nwin = ms / win_ms < MAX_WIN ? ms / win_ms : MAX_WIN;
    u64 gap_cycles = gap_ns * khz / 1000000, gaps = 0, stolen = 0;
    u64 win_cycles = win_ms * khz, total = ms * khz;
    u64 blackout_at = settle_ms * khz, blackout_ns = 0, during = 0;

    struct ref r0 = reference();
    u64 c0 = rt_irq_count, t0 = rdtsc(), prev = t0, last_count = c0, w = 0;
    int blacked_out = blackout_ms == 0;
    for (;;) {
        u64 t = rdtsc();
        if (t - prev > gap_cycles) {
            gaps++;
            stolen += t - prev;
        }
        prev = t;
        u64 el = t - t0;
        if (el >= total)
            break;
        while (w < nwin && el >= (w + 1) * win_cycles) {
            u64 now = rt_irq_count;
            win[w++] = now - last_count;
            last_count = now;
        }
        if (!blacked_out && el >= blackout_at) {
            /* A section that takes no exits: interrupts off, no I/O. */
            irq_off();
            u64 before = rt_irq_count;
            struct ref b0 = reference();
            u64 bt0 = rdtsc();
            while (rdtsc() - bt0 < blackout_ms * khz)
                cpu_relax();
            struct ref b1 = reference();
            during = rt_irq_count - before;
            blackout_ns = b1.ns - b0.ns;
            irq_on();
            blacked_out = 1;
            prev = rdtsc();
        }
    }
    struct ref r1 = reference();
    u64 n = rt_irq_count - c0;
    irq_off();
    outb(0x21, 0xFF);
    outb(0xA1, 0xFF);
    rt_printf("ticks: n=%lu ns=%lu blackout_ns=%lu during_blackout=%lu gaps=%lu stolen=%lu "
              "khz=%lu\n", n, r1.ns - r0.ns, blackout_ns, during, gaps, stolen, khz);
    rt_printf("win:");
    for (u64 i = 0; i < w; i++)
        rt_printf(" %lu", win[i]);
    rt_printf("\n");
    return 0;
}

int main(int cpu, int ncpus, const char *args)
{
    (void)ncpus;
    if (cpu != 0)
        return 0;
    rt_kcalls[KCALL_CPUID] = kc_cpuid;
    rt_kcalls[KCALL_SET_IF] = kc_set_if;
    for (const char *p = args; *p; p++)
        if (!rt_strncmp(p, "mode=ticks", 10))
            return mode_ticks(args);
    return mode_rate(args);
}
