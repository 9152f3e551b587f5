/* The shared guest runtime: CPL0 set-up (TSS, IDT), fault reporting, and
 * the CPL3 helpers programs use (console, exit, hypercalls). */
#include <stdarg.h>
#include "hvkit.h"

#define KCODE 0x08
#define UCODE 0x1b
#define UDATA 0x23
#define TSS0_INDEX 5
#define STACK_SIZE 16384
#define IOMAP_BYTES 8192

struct tss {
    u32 reserved0;
    u64 rsp[3];
    u64 reserved1;
    u64 ist[7];
    u64 reserved2;
    u16 reserved3;
    u16 iomap_base;
    u8 iomap[IOMAP_BYTES + 1];   /* all zero: every port open at CPL3 */
} __attribute__((packed));

struct gate {
    u16 off0, sel;
    u8 ist, type;
    u16 off1;
    u32 off2, reserved;
} __attribute__((packed));

struct desc_ptr {
    u16 limit;
    u64 base;
} __attribute__((packed));

struct hc_block {
    u64 nr, args[6], ret;
} __attribute__((aligned(64)));

/* Per-vCPU data, reached at CPL3 through the FS base set at CPL0. */
struct percpu {
    struct percpu *self;
    u32 cpu;
    u32 apic_id;          /* from CPUID at CPL0, where KVM answers it */
    struct hc_block hc;
} __attribute__((aligned(64)));

u64 rt_gdt[TSS0_INDEX + 2 * MAX_CPUS] = {
    0,
    0x00AF9B000000FFFFul,   /* 0x08 kernel code, 64-bit */
    0x00CF93000000FFFFul,   /* 0x10 kernel data */
    0x00AFFB000000FFFFul,   /* 0x18 user code, 64-bit, DPL3 */
    0x00CFF3000000FFFFul,   /* 0x20 user data, DPL3 */
};
struct desc_ptr rt_gdt_ptr = { sizeof(rt_gdt) - 1, (u64)rt_gdt };
static struct gate idt[256] __attribute__((aligned(16)));
struct desc_ptr rt_idt_ptr = { sizeof(idt) - 1, (u64)idt };
static struct tss tss[MAX_CPUS] __attribute__((aligned(64)));
u8 rt_kstacks[MAX_CPUS][STACK_SIZE] __attribute__((aligned(16)));
static u8 ustacks[MAX_CPUS][STACK_SIZE] __attribute__((aligned(16)));
static struct percpu percpu[MAX_CPUS];
volatile u64 rt_irq_count;

extern char rt_exc0[], rt_exc1[], rt_exc2[], rt_exc3[], rt_exc4[], rt_exc5[], rt_exc6[],
    rt_exc7[], rt_exc8[], rt_exc9[], rt_exc10[], rt_exc11[], rt_exc12[], rt_exc13[],
    rt_exc14[], rt_exc15[], rt_exc16[], rt_exc17[], rt_exc18[], rt_exc19[], rt_exc20[],
    rt_exc21[], rt_exc22[], rt_exc23[], rt_exc24[], rt_exc25[], rt_exc26[], rt_exc27[],
    rt_exc28[], rt_exc29[], rt_exc30[], rt_exc31[], rt_irq_entry[], rt_bp_entry[];

static struct percpu *this_cpu(void)
{
    struct percpu *pc;
    __asm__ volatile("mov %%fs:0, %0" : "=r"(pc));
    return pc;
}

/* The IDT as data: both _start and a VMM that builds the runtime's state
 * (see rt_layout) fill it from this one table. */
const struct rt_gate rt_gates[] = {
#define EXC(v) { (u64)rt_exc##v, v, 0x8E, {0} }
    EXC(0), EXC(1), EXC(2), EXC(4), EXC(5), EXC(6), EXC(7), EXC(8), EXC(9),
    EXC(10), EXC(11), EXC(12), EXC(13), EXC(14), EXC(15), EXC(16), EXC(17), EXC(18),
    EXC(19), EXC(20), EXC(21), EXC(22), EXC(23), EXC(24), EXC(25), EXC(26), EXC(27),
    EXC(28), EXC(29), EXC(30), EXC(31),
#undef EXC
    { (u64)rt_bp_entry, 3, 0xEE, {0} },   /* int3 allowed from CPL3: the kernel-call gate */
#define IRQ(v) { (u64)rt_irq_entry, v, 0x8E, {0} }
    IRQ(32), IRQ(33), IRQ(34), IRQ(35), IRQ(36), IRQ(37), IRQ(38), IRQ(39),
    IRQ(40), IRQ(41), IRQ(42), IRQ(43), IRQ(44), IRQ(45), IRQ(46), IRQ(47), IRQ(255),
#undef IRQ
};
#define NGATES (sizeof(rt_gates) / sizeof(rt_gates[0]))

const struct rt_layout rt_layout = {
    .magic = RT_LAYOUT_MAGIC,
    .version = RT_LAYOUT_VERSION,
    .max_cpus = MAX_CPUS,
    .gdt = (u64)rt_gdt,
    .gdt_size = sizeof(rt_gdt),
    .tss_index = TSS0_INDEX,
    .user_code = UCODE,
    .user_data = UDATA,
    .idt = (u64)idt,
    .idt_size = sizeof(idt),
    .gates = (u64)rt_gates,
    .ngates = NGATES,
    .tss = (u64)tss,
    .tss_size = sizeof(struct tss),
    .iomap_offset = __builtin_offsetof(struct tss, iomap),
    .iomap_bytes = IOMAP_BYTES,
    .percpu = (u64)percpu,
    .percpu_size = sizeof(struct percpu),
    .kstacks = (u64)rt_kstacks,
    .ustacks = (u64)ustacks,
    .stack_size = STACK_SIZE,
    .pml4 = (u64)rt_pml4,
    .user_entry = (u64)rt_user_start,
};

/* CPL0, once per vCPU: every instruction here is emulated on nested hosts,
 * which is why hvkit's VMM does all of this itself and enters
 * rt_user_start at CPL3 instead (see rt_layout); other VMMs enter _start. */
u64 rt_cpu_setup(u64 cpu)
{
    struct tss *t = &tss[cpu];
    u64 base = (u64)t, limit = sizeof(*t) - 1;
    struct percpu *pc = &percpu[cpu];
    u32 a, b, c, d;
    pc->self = pc;
    pc->cpu = (u32)cpu;
    cpuid(1, 0, &a, &b, &c, &d);
    pc->apic_id = b >> 24;
    __asm__ volatile("wrmsr" :: "c"(0xC0000100u), "a"((u32)(u64)pc), "d"((u32)((u64)pc >> 32)));
    t->rsp[0] = (u64)&rt_kstacks[cpu + 1][0];
    t->iomap_base = __builtin_offsetof(struct tss, iomap);
    t->iomap[IOMAP_BYTES] = 0xFF;
    rt_gdt[TSS0_INDEX + 2 * cpu] = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) |
        (0x89ul << 40) | (((limit >> 16) & 0xF) << 48) | (((base >> 24) & 0xFF) << 56);
    rt_gdt[TSS0_INDEX + 2 * cpu + 1] = base >> 32;
    for (u64 i = 0; i < NGATES; i++) {
        const struct rt_gate *s = &rt_gates[i];
        struct gate *g = &idt[s->vector];
        g->off0 = s->handler & 0xFFFF;
        g->sel = KCODE;
        g->ist = 0;
        g->type = s->type;
        g->off1 = (s->handler >> 16) & 0xFFFF;
        g->off2 = s->handler >> 32;
        g->reserved = 0;
    }
    return (u64)&ustacks[cpu + 1][0];
}

/* An exception at any level: tell the host, which stops the VM with a
 * GuestCrash naming the vector and the faulting context. */
void rt_fault(u64 *frame)
{
    u64 cr2;
    __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
    struct percpu *pc = this_cpu();
    struct hc_block *h = &pc->hc;
    h->nr = HC_FAULT;
    h->args[0] = frame[0];   /* vector */
    h->args[1] = frame[1];   /* error code */
    h->args[2] = frame[2];   /* rip */
    h->args[3] = cr2;
    h->args[4] = frame[5];   /* rsp */
    h->args[5] = pc->cpu;
    outl(HYPERCALL_PORT, (u32)(u64)h);
}

/* ---- kernel calls: CPL3 asks CPL0 through int3 ---- */

struct bp_regs {
    u64 rax, rbx, rcx, rdx, rsi, rdi, rbp, r8, r9, r10, r11, r12, r13, r14, r15;
    u64 rip, cs, rflags, rsp, ss;
};

static u64 kc_invlpg(u64 addr, u64 unused)
{
    (void)unused;
    __asm__ volatile("invlpg (%0)" :: "r"(addr) : "memory");
    return 0;
}

static u64 kc_read_cr3(u64 a, u64 b)
{
    (void)a;
    (void)b;
    u64 v;
    __asm__ volatile("mov %%cr3, %0" : "=r"(v));
    return v;
}

static u64 kc_write_cr3(u64 v, u64 unused)
{
    (void)unused;
    __asm__ volatile("mov %0, %%cr3" :: "r"(v) : "memory");
    return 0;
}

static u64 kc_read_msr(u64 index, u64 unused)
{
    (void)unused;
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"((u32)index));
    return ((u64)hi << 32) | lo;
}

static u64 kc_write_msr(u64 index, u64 value)
{
    __asm__ volatile("wrmsr" :: "c"((u32)index), "a"((u32)value), "d"((u32)(value >> 32)));
    return 0;
}

rt_kcall_fn rt_kcalls[RT_KCALLS] = {
    [KCALL_INVLPG] = kc_invlpg,
    [KCALL_READ_CR3] = kc_read_cr3,
    [KCALL_WRITE_CR3] = kc_write_cr3,
    [KCALL_READ_MSR] = kc_read_msr,
    [KCALL_WRITE_MSR] = kc_write_msr,
};

void rt_bp(struct bp_regs *r)
{
    if (r->rax == KCALL_MAGIC && r->rdi < RT_KCALLS && rt_kcalls[r->rdi]) {
        r->rax = rt_kcalls[r->rdi](r->rsi, r->rdx);
        /* Nested PVM hosts clear IOPL on this iretq whatever the frame says,
         * so CPL3 code must not rely on it afterwards (no sti/cli); port I/O
         * keeps working through the TSS I/O bitmap. */
        return;
    }
    /* A real breakpoint (or a bad kernel call): report it like any fault.
     * Frame layout for rt_fault: vector, error, rip, cs, rflags, rsp. */
    u64 frame[7] = { 3, 0, r->rip, r->cs, r->rflags, r->rsp, r->ss };
    rt_fault(frame);
    for (;;)
        ;
}

u64 rt_kcall(u64 nr, u64 a0, u64 a1)
{
    u64 ret;
    __asm__ volatile("int3" : "=a"(ret) : "a"(KCALL_MAGIC), "D"(nr), "S"(a0), "d"(a1) : "memory");
    return ret;
}

void rt_irq(void)
{
    __atomic_fetch_add(&rt_irq_count, 1, __ATOMIC_RELAXED);
    *(volatile u32 *)0xFEE000B0ul = 0;   /* LAPIC EOI */
}

void rt_user_start(u64 cpu, u64 ncpus, const char *args)
{
    int code = main((int)cpu, (int)ncpus, args);
    if (cpu == 0)
        rt_exit(code);
    for (;;)
        cpu_relax();
}

/* ---- CPL3 helpers ---- */

void *memset(void *d, int c, size_t n)
{
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
    u8 *p = d;
    const u8 *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

size_t rt_strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

int rt_strncmp(const char *a, const char *b, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (a[i] != b[i] || !a[i])
            return (u8)a[i] - (u8)b[i];
    }
    return 0;
}

static volatile int console_lock;

/* One string at a time, so lines from different vCPUs do not interleave
 * (some hosts split rep outsb into an exit per byte). */
void rt_write(const char *s, size_t n)
{
    if (!n)
        return;
    while (__atomic_exchange_n(&console_lock, 1, __ATOMIC_ACQUIRE))
        cpu_relax();
    __asm__ volatile("rep outsb" : "+S"(s), "+c"(n) : "d"((u16)COM1) : "memory");
    __atomic_store_n(&console_lock, 0, __ATOMIC_RELEASE);
}

void rt_puts(const char *s) { rt_write(s, rt_strlen(s)); }

static char *fmt_u(char *end, u64 v, unsigned base)
{
    *--end = 0;
    do {
        *--end = "0123456789abcdef"[v % base];
        v /= base;
    } while (v);
    return end;
}

void rt_printf(const char *fmt, ...)
{
    char out[256], num[24];
    size_t n = 0;
    va_list ap;
    va_start(ap, fmt);
    for (const char *p = fmt; *p && n < sizeof(out) - 24; p++) {
        if (*p != '%') {
            out[n++] = *p;
            continue;
        }
        p++;
        int lng = 0;
        while (*p == 'l') {
            lng = 1;
            p++;
        }
        const char *s = 0;
        switch (*p) {
        case 'd': {
            s64 v = lng ? va_arg(ap, s64) : va_arg(ap, int);
            if (v < 0) {
                out[n++] = '-';
                v = -v;
            }
            s = fmt_u(num + sizeof(num), (u64)v, 10);
            break;
        }
        case 'u':
            s = fmt_u(num + sizeof(num), lng ? va_arg(ap, u64) : va_arg(ap, unsigned), 10);
            break;
        case 'x':
            s = fmt_u(num + sizeof(num), lng ? va_arg(ap, u64) : va_arg(ap, unsigned), 16);
            break;
        case 'p':
            s = fmt_u(num + sizeof(num), (u64)va_arg(ap, void *), 16);
            out[n++] = '0';
            out[n++] = 'x';
            break;
        case 's':
            s = va_arg(ap, const char *);
            break;
        case 'c':
            out[n++] = (char)va_arg(ap, int);
            break;
        case '%':
            out[n++] = '%';
            break;
        default:
            break;
        }
        while (s && *s && n < sizeof(out) - 1)
            out[n++] = *s++;
    }
    va_end(ap);
    rt_write(out, n);
}

int rt_getc(void)
{
    while (!(inb(COM1 + 5) & 1))
        cpu_relax();
    return inb(COM1);
}

void rt_exit(int code)
{
    outl(EXIT_PORT, (u32)code);
    for (;;)
        cpu_relax();
}

/* CPUID executed at CPL3 may run natively on nested hosts and describe
 * the host CPU; the runtime asked at CPL0 instead. */
u32 rt_apic_id(void) { return this_cpu()->apic_id; }

u32 rt_lapic_id(void) { return *(volatile u32 *)0xFEE00020ul >> 24; }

int rt_cpu(void) { return (int)this_cpu()->cpu; }

s64 rt_hypercall(u64 nr, u64 a0, u64 a1, u64 a2, u64 a3, u64 a4, u64 a5)
{
    struct hc_block *h = &this_cpu()->hc;
    h->nr = nr;
    h->args[0] = a0;
    h->args[1] = a1;
    h->args[2] = a2;
    h->args[3] = a3;
    h->args[4] = a4;
    h->args[5] = a5;
    h->ret = 0;
    outl(HYPERCALL_PORT, (u32)(u64)h);
    return (s64)h->ret;
}

/* The integer value of "key=N" in the argument string, or def. */
int rt_arg_int(const char *args, const char *key, int def)
{
    size_t kl = rt_strlen(key);
    for (const char *p = args; p && *p;) {
        if (rt_strncmp(p, key, kl) == 0 && p[kl] == '=') {
            const char *q = p + kl + 1;
            int neg = 0, v = 0;
            if (*q == '-') {
                neg = 1;
                q++;
            }
            while (*q >= '0' && *q <= '9')
                v = v * 10 + (*q++ - '0');
            return neg ? -v : v;
        }
        while (*p && *p != ' ')
            p++;
        while (*p == ' ')
            p++;
    }
    return def;
}
