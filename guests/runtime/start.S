/* CPL0 entry: the fewest instructions that get us to CPL3, because CPL0
 * code is emulated one instruction at a time on nested hosts. */
#define KCODE 0x08
#define KDATA 0x10
#define UCODE 0x1b
#define UDATA 0x23
#define TSS0  0x28
#define STACK_SHIFT 14

    .section .text.start, "ax"
    .code64
    .global _start
_start:
    cli
    mov %rdi, %r12
    mov %rsi, %r13
    mov %rdx, %r14
    lgdt rt_gdt_ptr(%rip)
    lea 1f(%rip), %rax
    pushq $KCODE
    pushq %rax
    lretq
1:  mov $KDATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    lea rt_pml4(%rip), %rax
    mov %rax, %cr3
    lea 1(%r12), %rax
    shl $STACK_SHIFT, %rax
    lea rt_kstacks(%rip), %rsp
    add %rax, %rsp
    mov %r12, %rdi
    call rt_cpu_setup          /* returns the user stack top */
    mov %r12, %rcx
    shl $4, %rcx
    add $TSS0, %rcx
    ltr %cx
    lidt rt_idt_ptr(%rip)
    pushq $UDATA
    pushq %rax
    pushq $0x3002              /* IOPL 3, interrupts off */
    pushq $UCODE
    lea rt_user_start(%rip), %rax
    pushq %rax
    mov %r12, %rdi
    mov %r13, %rsi
    mov %r14, %rdx
    iretq

/* Exception stubs: push a zero error code where the CPU pushes none, then
 * the vector, and report through the hypercall port. */
.macro EXC vec, has_err
    .global rt_exc\vec
rt_exc\vec:
    .if \has_err == 0
    pushq $0
    .endif
    pushq $\vec
    jmp exc_common
.endm

EXC 0,0
EXC 1,0
EXC 2,0
EXC 3,0
EXC 4,0
EXC 5,0
EXC 6,0
EXC 7,0
EXC 8,1
EXC 9,0
EXC 10,1
EXC 11,1
EXC 12,1
EXC 13,1
EXC 14,1
EXC 15,0
EXC 16,0
EXC 17,1
EXC 18,0
EXC 19,0
EXC 20,0
EXC 21,1
EXC 22,0
EXC 23,0
EXC 24,0
EXC 25,0
EXC 26,0
EXC 27,0
EXC 28,0
EXC 29,1
EXC 30,1
EXC 31,0

exc_common:
    mov %rsp, %rdi             /* vector, error, rip, cs, rflags, rsp, ss */
    and $-16, %rsp
    call rt_fault
2:  jmp 2b

/* int3 from CPL3 is the kernel-call gate (int $0x80 and syscall do not
 * work on every host; #BP is delivered everywhere). All registers are
 * saved; rt_bp() may change them (rax carries the result). */
    .global rt_bp_entry
rt_bp_entry:
    push %r15
    push %r14
    push %r13
    push %r12
    push %r11
    push %r10
    push %r9
    push %r8
    push %rbp
    push %rdi
    push %rsi
    push %rdx
    push %rcx
    push %rbx
    push %rax
    mov %rsp, %rdi
    call rt_bp
    pop %rax
    pop %rbx
    pop %rcx
    pop %rdx
    pop %rsi
    pop %rdi
    pop %rbp
    pop %r8
    pop %r9
    pop %r10
    pop %r11
    pop %r12
    pop %r13
    pop %r14
    pop %r15
    iretq

/* External interrupts (vectors 32-255) are counted and acknowledged. */
    .global rt_irq_entry
rt_irq_entry:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    call rt_irq
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    iretq

    .section .data.pagetables, "aw"
    .balign 4096
    .global rt_pml4
rt_pml4:
    .quad rt_pdpt + 7
    .fill 511, 8, 0
rt_pdpt:
    .quad rt_pd + 7
    .quad rt_pd + 0x1000 + 7
    .quad rt_pd + 0x2000 + 7
    .quad rt_pd + 0x3000 + 7
    .fill 508, 8, 0
rt_pd:                          /* 4 GiB identity map, 2 MiB user pages */
    .set i, 0
    .rept 2048
    .quad (i << 21) | 0x87
    .set i, i + 1
    .endr
