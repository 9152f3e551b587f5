/* System calls and stderr messages for hvkit's static guest tools (no libc). */
#ifndef HVKIT_TOOLS_SYSCALL_H
#define HVKIT_TOOLS_SYSCALL_H

#define SYS_write 1
#define SYS_exit 60

static inline long sys3(long n, long a, long b, long c)
{
    long r;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return r;
}

static inline long slen(const char *s)
{
    long n = 0;
    while (s[n])
        n++;
    return n;
}

static inline void say(const char *s)
{
    sys3(SYS_write, 2, (long)s, slen(s));
}

/* The entry point: start_c(sp) gets the initial stack (argc, argv...). */
#define TOOL_ENTRY \
    __asm__(".global _start\n_start:\n mov %rsp, %rdi\n and $-16, %rsp\n call start_c\n")

#endif
