/* Selective dedup, guest side: a tiny "OS" (CPL0 kernel calls) that owns a
 * mergeable window of guest-physical memory, and an application (CPL3)
 * that asks it to deduplicate some of its pages.
 *
 * The application's heap lives at virtual HEAP_VA, mapped with 4 KiB pages
 * by page tables the OS builds (PML4[1] of the runtime's tables). Its pages
 * start out backed by private guest-physical pages at PRIV_BASE. When the
 * app asks for dedup of a page, the OS copies it into a free page of the
 * window, points the app's PTE there, and tells the host by hypercall which
 * window pages are now mergeable. Disabling reverses it.
 *
 * Modes (argument string):
 *   mode=dedup pages=N others=M seed=S cow=K disable=D
 *       fill N nominated + M other heap pages with contents that depend
 *       only on (seed, set, page), nominate the N, gate 1 (host merges),
 *       time K writes to merged pages and K to private ones, verify,
 *       gate 2, disable D pages, verify, exit 0 (1 on a content mismatch).
 *   mode=plain pages=N others=M seed=S: the same contents, no dedup calls
 *       (the whole-VM merging baseline), gate 1, exit.
 *   mode=dirty base_mb=B count=N stride=S: write N pages from B MiB every
 *       S pages, gate 1, the next page of each, gate 2, exit.
 *   mode=slots poll_mb=P ro_mb=R: spin until the u64 at P MiB reads other
 *       than all-ones (no RAM there yet), print it, write the u64 at R MiB,
 *       print what reads back, exit.
 */
#include "runtime/hvkit.h"

#define HC_DEDUP_INFO 0x1100
#define HC_DEDUP_ENABLE 0x1101
#define HC_DEDUP_DISABLE 0x1102
#define HC_GATE 0x11F0

#define KC_HEAP_INIT (KCALL_USER + 0)
#define KC_MOVE_BEGIN (KCALL_USER + 1)
#define KC_MOVE_END (KCALL_USER + 2)

#define PAGE 4096ul
#define HEAP_VA 0x8000000000ul          /* PML4 slot 1 */
#define PRIV_BASE (8ul << 20)
#define MAX_HEAP_PAGES 65536ul          /* 256 MiB of heap */
#define MAX_WIN_PAGES 65536ul
#define PTE_USER 7ul                    /* present, writable, user */

static u64 heap_pdpt[512] __attribute__((aligned(4096)));
static u64 heap_pd[512] __attribute__((aligned(4096)));
static u64 heap_pt[MAX_HEAP_PAGES] __attribute__((aligned(4096)));
static u32 heap_win[MAX_HEAP_PAGES];    /* window page + 1, or 0 when private */
static u32 win_free[MAX_WIN_PAGES];     /* stack of freed window pages */
static u64 heap_pages, win_gpa, win_pages, win_next, win_nfree;

/* ---------------- the OS: CPL0, every instruction emulated here ---------------- */

/* Page moves are split in two kernel calls around a copy that the
 * application's side of the OS library does at CPL3: CPL0 is emulated here,
 * and a 4 KiB rep movsq at CPL0 costs ~0.7 ms against a few us natively.
 * The OS trusts nothing in the request but va and n: which pages move
 * where comes from its own records. */
#define MOVE_MAX 512
struct move_req {
    u64 va, n;
    u64 src[MOVE_MAX], dst[MOVE_MAX];   /* filled by the OS; 0 = nothing to copy */
};

enum { PG_PRIVATE, PG_ENABLING, PG_WINDOW, PG_DISABLING };
static u8 heap_state[MAX_HEAP_PAGES];

static u64 k_heap_init(u64 npages, u64 unused)
{
    (void)unused;
    if (npages == 0 || npages > MAX_HEAP_PAGES || heap_pages)
        return (u64)-22;
    if (PRIV_BASE + npages * PAGE > win_gpa)
        return (u64)-12;   /* private pages would run into the window */
    for (u64 i = 0; i < npages; i++)
        heap_pt[i] = (PRIV_BASE + i * PAGE) | PTE_USER;
    for (u64 i = 0; i < (npages + 511) / 512; i++)
        heap_pd[i] = (u64)&heap_pt[i * 512] | PTE_USER;
    heap_pdpt[0] = (u64)heap_pd | PTE_USER;
    ((u64 *)rt_pml4)[1] = (u64)heap_pdpt | PTE_USER;
    heap_pages = npages;
    u64 cr3;
    __asm__ volatile("mov %%cr3, %0; mov %0, %%cr3" : "=r"(cr3) :: "memory");
    return 0;
}

static s64 win_alloc(void)
{
    if (win_nfree)
        return win_free[--win_nfree];
    if (win_next < win_pages)
        return (s64)win_next++;
    return -1;
}

/* Tell the host about a run of window pages; returns the host's answer. */
static s64 flush_run(u64 nr, s64 first, u64 count)
{
    if (!count)
        return 0;
    return rt_hypercall(nr, win_gpa + (u64)first * PAGE, count, 0, 0, 0, 0);
}

static int heap_range(const struct move_req *r, u64 *first)
{
    u64 va = r->va, n = r->n;
    if (va < HEAP_VA || (va & (PAGE - 1)) || n == 0 || n > MOVE_MAX)
        return 0;
    *first = (va - HEAP_VA) / PAGE;
    return *first < heap_pages && n <= heap_pages - *first;
}

/* Phase 1: pick the pages' new homes and say what to copy where. */
static u64 k_move_begin(u64 req, u64 enable)
{
    struct move_req *r = (struct move_req *)req;
    u64 first, count = 0;
    if (!heap_range(r, &first))
        return (u64)-22;
    for (u64 k = 0; k < r->n; k++) {
        u64 i = first + k;
        r->src[k] = r->dst[k] = 0;
        if (enable && heap_state[i] == PG_PRIVATE) {
            s64 w = win_alloc();
            if (w < 0)
                return (u64)-28;   /* ENOSPC: the window is full */
            heap_win[i] = (u32)w + 1;
            heap_state[i] = PG_ENABLING;
            r->src[k] = PRIV_BASE + i * PAGE;
            r->dst[k] = win_gpa + (u64)w * PAGE;
            count++;
        } else if (!enable && heap_state[i] == PG_WINDOW) {
            heap_state[i] = PG_DISABLING;
            r->src[k] = win_gpa + (u64)(heap_win[i] - 1) * PAGE;
            r->dst[k] = PRIV_BASE + i * PAGE;
            count++;
        }
    }
    return count;
}

/* Phase 2: remap the copied pages and tell the host, one hypercall per
 * run of consecutive window pages. */
static u64 k_move_end(u64 req, u64 enable)
{
    struct move_req *r = (struct move_req *)req;
    u64 first, done = 0, len = 0;
    s64 run = -1, err = 0, h;
    u64 nr = enable ? HC_DEDUP_ENABLE : HC_DEDUP_DISABLE;
    if (!heap_range(r, &first))
        return (u64)-22;
    for (u64 i = first; i < first + r->n; i++) {
        u8 want = enable ? PG_ENABLING : PG_DISABLING;
        if (heap_state[i] != want)
            continue;
        s64 w = (s64)heap_win[i] - 1;
        u64 phys = enable ? win_gpa + (u64)w * PAGE : PRIV_BASE + i * PAGE;
        heap_pt[i] = phys | PTE_USER;
        __asm__ volatile("invlpg (%0)" :: "r"(HEAP_VA + i * PAGE) : "memory");
        heap_state[i] = enable ? PG_WINDOW : PG_PRIVATE;
        if (!enable) {
            heap_win[i] = 0;
            win_free[win_nfree++] = (u32)w;
        }
        done++;
        if (run >= 0 && w == run + (s64)len) {
            len++;
            continue;
        }
        h = flush_run(nr, run, len);
        if (h < 0 && !err)
            err = h;
        run = w;
        len = 1;
    }
    h = flush_run(nr, run, len);
    if (h < 0 && !err)
        err = h;
    return err ? (u64)err : done;
}

/* The OS library call an application makes: move [va, +n pages) into the
 * mergeable window (enable) or back to private memory. */
static struct move_req move_req;

static s64 os_dedup(u64 va, u64 n, int enable)
{
    u64 done = 0;
    while (done < n) {
        struct move_req *r = &move_req;
        r->va = va + done * PAGE;
        r->n = n - done < MOVE_MAX ? n - done : MOVE_MAX;
        s64 c = (s64)rt_kcall(KC_MOVE_BEGIN, (u64)r, (u64)enable);
        if (c < 0)
            return c;
        for (u64 k = 0; k < r->n; k++) {
            if (!r->dst[k])
                continue;
            u64 *d = (u64 *)r->dst[k];
            const u64 *s = (const u64 *)r->src[k];
            for (u64 j = 0; j < PAGE / 8; j++)
                d[j] = s[j];
        }
        c = (s64)rt_kcall(KC_MOVE_END, (u64)r, (u64)enable);
        if (c < 0)
            return c;
        done += r->n;
    }
    return (s64)done;
}

/* ---------------- the application: CPL3, native speed ---------------- */

static u64 page_word(u64 seed, u64 set, u64 page, u64 j)
{
    u64 h = (seed * 1000003ul + set * 0x100000000ul + page + 1) * 0x9E3779B97F4A7C15ul;
    return h ^ ((j + 1) * 0xBF58476D1CE4E5B9ul);
}

static void fill(u64 *p, u64 seed, u64 set, u64 page)
{
    for (u64 j = 0; j < PAGE / 8; j++)
        p[j] = page_word(seed, set, page, j);
}

/* Mismatching pages among heap pages [base + first, base + n) that hold
 * page numbers first..n-1 of a set. */
static u64 check(u64 base, u64 first, u64 n, u64 seed, u64 set)
{
    u64 bad = 0;
    for (u64 i = first; i < n; i++) {
        const u64 *p = (const u64 *)(HEAP_VA + (base + i) * PAGE);
        for (u64 j = 0; j < PAGE / 8; j++)
            if (p[j] != page_word(seed, set, i, j)) {
                bad++;
                break;
            }
    }
    return bad;
}

static void gate(int n) { rt_hypercall(HC_GATE, (u64)n, 0, 0, 0, 0, 0); }

static u64 median(u64 *v, int n)
{
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && v[j - 1] > v[j]; j--) {
            u64 t = v[j];
            v[j] = v[j - 1];
            v[j - 1] = t;
        }
    return n ? v[n / 2] : 0;
}

static int run_dedup(const char *args, int enable)
{
    u64 pages = (u64)rt_arg_int(args, "pages", 1024);
    u64 others = (u64)rt_arg_int(args, "others", 1024);
    u64 seed = (u64)rt_arg_int(args, "seed", 1);
    int cow = rt_arg_int(args, "cow", 16);
    u64 disable = (u64)rt_arg_int(args, "disable", 0);
    if (cow > 64)
        cow = 64;
    if ((u64)cow > pages || (u64)cow > others || disable > pages) {
        rt_printf("dedup: bad arguments\n");
        return 2;
    }
    s64 g = rt_hypercall(HC_DEDUP_INFO, 0, 0, 0, 0, 0, 0);
    s64 s = rt_hypercall(HC_DEDUP_INFO, 1, 0, 0, 0, 0, 0);
    if (enable && (g <= 0 || s <= 0)) {
        rt_printf("dedup: no mergeable window from the host (%ld)\n", g);
        return 3;
    }
    win_gpa = enable ? (u64)g : 0xC0000000ul;
    win_pages = enable ? (u64)s / PAGE : 0;
    if (win_pages > MAX_WIN_PAGES)
        win_pages = MAX_WIN_PAGES;
    s64 r = (s64)rt_kcall(KC_HEAP_INIT, pages + others, 0);
    if (r) {
        rt_printf("dedup: heap init failed %ld\n", r);
        return 4;
    }
    u64 t0 = rdtsc();
    for (u64 i = 0; i < pages; i++)
        fill((u64 *)(HEAP_VA + i * PAGE), seed, 1, i);
    for (u64 i = 0; i < others; i++)
        fill((u64 *)(HEAP_VA + (pages + i) * PAGE), seed, 2, i);
    u64 t1 = rdtsc();
    if (enable) {
        r = os_dedup(HEAP_VA, pages, 1);
        if (r != (s64)pages) {
            rt_printf("dedup: enable failed: %ld\n", r);
            return 5;
        }
    }
    u64 t2 = rdtsc();
    u64 bad = check(0, 0, pages, seed, 1) + check(pages, 0, others, seed, 2);
    rt_printf("dedup: nominated %lu others %lu fill_cycles %lu enable_cycles %lu bad %lu\n",
              pages, others, t1 - t0, t2 - t1, bad);
    gate(1);
    if (!enable)
        return bad ? 1 : 0;

    /* Copy-on-write cost: the first write to a merged page vs a private one. */
    u64 merged[64], plain[64];
    for (int k = 0; k < cow; k++) {
        volatile u64 *m = (volatile u64 *)(HEAP_VA + (u64)k * PAGE);
        volatile u64 *p = (volatile u64 *)(HEAP_VA + (pages + (u64)k) * PAGE);
        u64 a = rdtsc();
        m[1] = 0x5157C0DEul + (u64)k;
        u64 b = rdtsc();
        p[1] = page_word(seed, 2, (u64)k, 1);
        u64 c = rdtsc();
        merged[k] = b - a;
        plain[k] = c - b;
    }
    u64 wbad = 0;
    for (int k = 0; k < cow; k++) {
        const u64 *m = (const u64 *)(HEAP_VA + (u64)k * PAGE);
        if (m[1] != 0x5157C0DEul + (u64)k || m[0] != page_word(seed, 1, (u64)k, 0))
            wbad++;
    }
    bad = check(0, (u64)cow, pages, seed, 1) + check(pages, 0, others, seed, 2);
    rt_printf("dedup: wrote %d merged pages: cow_cycles %lu plain_cycles %lu readback_bad %lu bad %lu\n",
              cow, median(merged, cow), median(plain, cow), wbad, bad);
    gate(2);
    if (disable) {
        u64 first = pages - disable;
        r = os_dedup(HEAP_VA + first * PAGE, disable, 0);
        u64 dbad = check(0, first, pages, seed, 1);
        rt_printf("dedup: disabled %ld pages, bad %lu\n", r, dbad);
        bad += dbad;
        gate(3);
    }
    return bad || wbad ? 1 : 0;
}

static int run_dirty(const char *args)
{
    u64 base = (u64)rt_arg_int(args, "base_mb", 32) << 20;
    u64 count = (u64)rt_arg_int(args, "count", 16);
    u64 stride = (u64)rt_arg_int(args, "stride", 3);
    for (int round = 0; round < 2; round++) {
        for (u64 i = 0; i < count; i++)
            *(volatile u64 *)(base + (i * stride + (u64)round) * PAGE + 8 * (u64)round) = i + 1;
        rt_printf("dirty: round %d wrote %lu pages\n", round, count);
        gate(round + 1);
    }
    return 0;
}

static int run_slots(const char *args)
{
    volatile u64 *poll = (volatile u64 *)((u64)rt_arg_int(args, "poll_mb", 48) << 20);
    volatile u64 *ro = (volatile u64 *)((u64)rt_arg_int(args, "ro_mb", 40) << 20);
    u64 v;
    while ((v = *poll) == ~0ul)
        cpu_relax();
    rt_printf("slots: poll value %lx\n", v);
    u64 before = *ro;
    *ro = 0x5A5A5A5Aul;
    rt_printf("slots: ro before %lx after %lx\n", before, *ro);
    return 0;
}

int main(int cpu, int ncpus, const char *args)
{
    (void)ncpus;
    if (cpu != 0)
        return 0;
    rt_kcalls[KC_HEAP_INIT] = k_heap_init;
    rt_kcalls[KC_MOVE_BEGIN] = k_move_begin;
    rt_kcalls[KC_MOVE_END] = k_move_end;
    if (!rt_strncmp(args, "mode=dirty", 10))
        return run_dirty(args);
    if (!rt_strncmp(args, "mode=slots", 10))
        return run_slots(args);
    if (!rt_strncmp(args, "mode=plain", 10))
        return run_dedup(args, 0);
    return run_dedup(args, 1);
}
