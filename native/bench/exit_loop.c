/* The baseline for benchmarks/exits.py: the least a VMM can do per port-I/O
 * exit. Plain C over the /dev/kvm ioctls: one VM, one memory slot, one vCPU
 * in 64-bit long mode at CPL0, the guest ELF's PT_LOAD segments copied in,
 * and a KVM_RUN loop that counts OUTs to the benchmark port until the guest
 * writes the exit port.
 *
 * It sets up the same state hvkit's setup_mode("long") does (GDT at 0x500,
 * identity page tables at 0x9000, the argument string at 0x8000, CPUID), so
 * the guest runs the very same instructions under both VMMs.
 *
 * usage: exit_loop GUEST.elf ENTRY_HEX ARGS BENCH_PORT [MEMORY_MIB]
 * prints one JSON object: exits counted, wall seconds of the run loop, the
 * guest's exit code (its TSC cycles >> 10) and a TSC frequency calibration.
 *
 * Build: gcc -O2 -o exit_loop exit_loop.c   (benchmarks/exits.py does this) */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <x86intrin.h>

#define GDT_ADDR 0x500
#define IDT_ADDR 0x520
#define ARGS_ADDR 0x8000
#define PML4_ADDR 0x9000
#define PDPT_ADDR 0xA000
#define PD_ADDR 0xB000
#define STACK_TOP 0x80000
#define EXIT_PORT 0x500

static void die(const char *what)
{
    fprintf(stderr, "exit_loop: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void fail(const char *what)
{
    fprintf(stderr, "exit_loop: %s\n", what);
    exit(2);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* TSC ticks per second against CLOCK_MONOTONIC, over 100 ms. */
static double tsc_hz(void)
{
    double t0 = now();
    uint64_t c0 = __rdtsc();
    while (now() - t0 < 0.1)
        ;
    uint64_t c1 = __rdtsc();
    return (c1 - c0) / (now() - t0);
}

static void load_elf(const char *path, uint8_t *mem, size_t size)
{
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        die(path);
    struct stat st;
    if (fstat(fd, &st) < 0)
        die("fstat");
    uint8_t *f = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (f == MAP_FAILED)
        die("mmap elf");
    Elf64_Ehdr *eh = (Elf64_Ehdr *)f;
    if (st.st_size < (off_t)sizeof(*eh) || memcmp(eh->e_ident, ELFMAG, SELFMAG) ||
        eh->e_ident[EI_CLASS] != ELFCLASS64)
        fail("not a 64-bit ELF");
    for (int i = 0; i < eh->e_phnum; i++) {
        Elf64_Phdr *ph = (Elf64_Phdr *)(f + eh->e_phoff + (size_t)i * eh->e_phentsize);
        if (ph->p_type != PT_LOAD)
            continue;
        if (ph->p_paddr + ph->p_memsz > size || ph->p_filesz > ph->p_memsz ||
            ph->p_offset + ph->p_filesz > (uint64_t)st.st_size)
            fail("segment does not fit");
        memcpy(mem + ph->p_paddr, f + ph->p_offset, ph->p_filesz);
        memset(mem + ph->p_paddr + ph->p_filesz, 0, ph->p_memsz - ph->p_filesz);
    }
    munmap(f, st.st_size);
    close(fd);
}

static struct kvm_segment seg(uint16_t sel, uint8_t type, uint8_t l, uint8_t db)
{
    struct kvm_segment s = {
        .base = 0, .limit = 0xFFFFFFFF, .selector = sel, .type = type,
        .present = 1, .dpl = 0, .db = db, .s = 1, .l = l, .g = 1,
    };
    return s;
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: %s GUEST.elf ENTRY_HEX ARGS BENCH_PORT [MEMORY_MIB]\n", argv[0]);
        return 2;
    }
    const char *elf = argv[1], *args = argv[3];
    uint64_t entry = strtoull(argv[2], NULL, 16);
    unsigned bench_port = (unsigned)strtoul(argv[4], NULL, 0);
    size_t mem_size = (argc > 5 ? strtoull(argv[5], NULL, 0) : 64) << 20;

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        die("KVM_CREATE_VM");
    uint8_t *mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE,
                        MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED)
        die("mmap guest memory");
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = mem_size,
        .userspace_addr = (uint64_t)mem,
    };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        die("KVM_SET_USER_MEMORY_REGION");
    if (ioctl(vm, KVM_SET_TSS_ADDR, 0xFFFBD000ul) < 0)
        die("KVM_SET_TSS_ADDR");
    /* hvkit's microVMs have an in-kernel irqchip; so does the baseline. */
    if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0)
        die("KVM_CREATE_IRQCHIP");

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        die("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size < 0)
        die("KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        die("mmap kvm_run");

    int nent = 256;
    struct kvm_cpuid2 *cpuid = calloc(1, sizeof(*cpuid) + nent * sizeof(struct kvm_cpuid_entry2));
    cpuid->nent = nent;
    if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) < 0)
        die("KVM_GET_SUPPORTED_CPUID");
    if (ioctl(vcpu, KVM_SET_CPUID2, cpuid) < 0)
        die("KVM_SET_CPUID2");

    /* Guest image, arguments, GDT, identity page tables (1 GiB, 2 MiB pages). */
    load_elf(elf, mem, mem_size);
    strncpy((char *)mem + ARGS_ADDR, args, 0x1000 - 1);
    uint64_t *gdt = (uint64_t *)(mem + GDT_ADDR);
    gdt[0] = 0;
    gdt[1] = 0x00AF9B000000FFFFull;   /* 0x08 64-bit code */
    gdt[2] = 0x00CF9B000000FFFFull;   /* 0x10 32-bit code */
    gdt[3] = 0x00CF93000000FFFFull;   /* 0x18 data */
    memset(mem + IDT_ADDR, 0, 8);
    uint64_t *pml4 = (uint64_t *)(mem + PML4_ADDR), *pdpt = (uint64_t *)(mem + PDPT_ADDR);
    uint64_t *pd = (uint64_t *)(mem + PD_ADDR);
    memset(pml4, 0, 4096);
    memset(pdpt, 0, 4096);
    pml4[0] = PDPT_ADDR | 7;
    pdpt[0] = PD_ADDR | 7;
    for (uint64_t i = 0; i < 512; i++)
        pd[i] = (i << 21) | 0x87;

    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
        die("KVM_GET_SREGS");
    sregs.cs = seg(0x08, 0xB, 1, 0);
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = seg(0x18, 0x3, 0, 1);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = 4 * 8 - 1;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = (1 << 5) | (1 << 9) | (1 << 10);            /* PAE, OSFXSR, OSXMMEXCPT */
    sregs.cr0 = 1 | (1u << 31) | (1 << 4) | (1 << 5);       /* PE, PG, ET, NE */
    sregs.efer = (1 << 8) | (1 << 10);                      /* LME, LMA */
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
        die("KVM_SET_SREGS");
    struct kvm_regs regs = {
        .rip = entry, .rsp = STACK_TOP, .rflags = 2,
        .rdi = 0, .rsi = 1, .rdx = ARGS_ADDR,
    };
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
        die("KVM_SET_REGS");

    /* The measured part: KVM_RUN until the exit port, counting bench OUTs. */
    uint64_t exits = 0, other = 0, runs = 0;
    uint32_t code = 0;
    double t0 = now();
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            die("KVM_RUN");
        }
        runs++;
        if (run->exit_reason == KVM_EXIT_INTR)
            continue;
        if (run->exit_reason != KVM_EXIT_IO) {
            struct kvm_regs r;
            ioctl(vcpu, KVM_GET_REGS, &r);
            fprintf(stderr, "exit_loop: unexpected exit reason %u at rip %#llx after %llu exits\n",
                    run->exit_reason, (unsigned long long)r.rip, (unsigned long long)exits);
            return 3;
        }
        uint8_t *data = (uint8_t *)run + run->io.data_offset;
        if (run->io.port == bench_port) {
            exits += run->io.count;
            continue;
        }
        if (run->io.port == EXIT_PORT && run->io.direction == KVM_EXIT_IO_OUT) {
            memcpy(&code, data, run->io.size < 4 ? run->io.size : 4);
            break;
        }
        /* Anything else (none expected): writes ignored, reads as zero. */
        other++;
        if (run->io.direction == KVM_EXIT_IO_IN)
            memset(data, 0, (size_t)run->io.size * run->io.count);
    }
    double seconds = now() - t0;
    printf("{\"exits\": %llu, \"seconds\": %.9f, \"exits_per_s\": %.1f, \"kvm_runs\": %llu, "
           "\"other_io\": %llu, \"guest_code\": %u, \"tsc_hz\": %.0f}\n",
           (unsigned long long)exits, seconds, exits / seconds, (unsigned long long)runs,
           (unsigned long long)other, code, tsc_hz());
    return 0;
}
