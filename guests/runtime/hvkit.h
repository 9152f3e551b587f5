/* The guest side of hvkit's contract with freestanding guests.
 *
 * The VMM enters _start in 64-bit mode at CPL0 on every vCPU with
 * rdi = vCPU index, rsi = vCPU count, rdx = address of the argument string.
 * The runtime installs its GDT, TSS (with an I/O bitmap that opens every
 * port), IDT and page tables, then calls main() at CPL3, where this host's
 * KVM runs code natively.
 *
 * A VMM may instead do that set-up itself, from the addresses rt_layout
 * publishes, and enter rt_user_start at CPL3 with the same three registers
 * (hvkit does: CPL0 code is emulated on nested hosts, so the runtime's
 * set-up costs a millisecond there). It then writes, for each vCPU n:
 *   - GDT entry tss_index + 2n (16 bytes): a busy 64-bit TSS descriptor
 *     for tss + n * tss_size, limit tss_size - 1;
 *   - in that TSS: rsp0 = kstacks + (n + 1) * stack_size, the I/O map base
 *     = iomap_offset, and the byte at iomap_offset + iomap_bytes = 0xFF;
 *   - percpu + n * percpu_size: { u64 self; u32 cpu; u32 apic_id; };
 *   - every IDT gate of the gates table (interrupt/trap gates, selector 0x08);
 * and sets CS = user_code, SS = DS = ES = user_data, TR = the TSS's
 * selector, GDTR/IDTR, CR3 = pml4, FS base = its percpu, RFLAGS with IOPL 3
 * and interrupts off, RSP = ustacks + (n + 1) * stack_size. */
#ifndef HVKIT_GUEST_H
#define HVKIT_GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long s64;
typedef unsigned long size_t;

#define MAX_CPUS 16

#define COM1 0x3F8
#define EXIT_PORT 0x500
#define HYPERCALL_PORT 0x510

#define HC_FAULT 1

#define RT_LAYOUT_MAGIC 0x54554f59414c5452ul   /* "RTLAYOUT" */
#define RT_LAYOUT_VERSION 1

struct rt_gate {
    u64 handler;
    u16 vector;
    u8 type;              /* 0x8E interrupt gate, 0xEE the same open to CPL3 */
    u8 reserved[5];
};

/* Where the runtime keeps its CPL0 state (addresses are guest-physical =
 * virtual; every field 64 bits, so a VMM reads it as an array). */
struct rt_layout {
    u64 magic, version, max_cpus;
    u64 gdt, gdt_size, tss_index, user_code, user_data;
    u64 idt, idt_size, gates, ngates;
    u64 tss, tss_size, iomap_offset, iomap_bytes;
    u64 percpu, percpu_size;
    u64 kstacks, ustacks, stack_size;
    u64 pml4, user_entry;
};
extern const struct rt_layout rt_layout;
extern const struct rt_gate rt_gates[];
void rt_user_start(u64 cpu, u64 ncpus, const char *args);

/* Every vCPU runs main(); vCPU 0's return value is the VM's exit code,
 * other vCPUs park when they return. */
int main(int cpu, int ncpus, const char *args);

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port) : "memory"); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port) : "memory"); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port) : "memory"); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port) : "memory"); return v; }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline u64 rdtsc(void) { u32 lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((u64)hi << 32) | lo; }
static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

void rt_write(const char *s, size_t n);   /* one exit per call (rep outsb) */
void rt_puts(const char *s);
void rt_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int rt_getc(void);                        /* blocks until the host sends a byte */
void rt_exit(int code) __attribute__((noreturn));
u32 rt_apic_id(void);                     /* CPUID leaf 1 as KVM reports it */
u32 rt_lapic_id(void);                    /* the local APIC's ID register */
int rt_cpu(void);
s64 rt_hypercall(u64 nr, u64 a0, u64 a1, u64 a2, u64 a3, u64 a4, u64 a5);
int rt_arg_int(const char *args, const char *key, int def);

/* Kernel calls: CPL3 code runs a CPL0 function through int3 (the gate that
 * works on every host). Programs add their own CPL0 services by storing a
 * function in rt_kcalls[n] for a free n (from KCALL_USER up). */
#define KCALL_MAGIC 0x4C4C41434Bul
#define RT_KCALLS 32
#define KCALL_INVLPG 0
#define KCALL_READ_CR3 1
#define KCALL_WRITE_CR3 2
#define KCALL_READ_MSR 3
#define KCALL_WRITE_MSR 4
#define KCALL_USER 8
typedef u64 (*rt_kcall_fn)(u64 a0, u64 a1);
extern rt_kcall_fn rt_kcalls[RT_KCALLS];
u64 rt_kcall(u64 nr, u64 a0, u64 a1);
extern u8 rt_pml4[];   /* the runtime's page tables: PML4, PDPT, 4 PDs (2 MiB pages) */
size_t rt_strlen(const char *s);
int rt_strncmp(const char *a, const char *b, size_t n);
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);

#endif
