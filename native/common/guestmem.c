/* Checked guest-RAM lookups: see guestmem.h. */
#include "guestmem.h"

#include <errno.h>
#include <stddef.h>
#include <string.h>

int hv_gm_add(struct hv_region *r, int *n, int max, uint64_t gpa, uint64_t size, uint8_t *hva)
{
    if (*n >= max)
        return -ENOSPC;
    r[(*n)++] = (struct hv_region){gpa, size, hva};
    return 0;
}

int hv_gm_index(const struct hv_region *r, int n, uint64_t gpa, uint64_t len)
{
    for (int i = 0; i < n; i++) {
        if (gpa < r[i].gpa)
            continue;
        uint64_t off = gpa - r[i].gpa;
        if (off <= r[i].size && len <= r[i].size - off)
            return i;
    }
    return -1;
}

uint8_t *hv_gm_ptr(const struct hv_region *r, int n, uint64_t gpa, uint64_t len)
{
    int i = hv_gm_index(r, n, gpa, len);
    return i < 0 ? NULL : r[i].hva + (gpa - r[i].gpa);
}

int hv_gm_read(const struct hv_region *r, int n, uint64_t gpa, uint64_t len, void *out)
{
    uint8_t *p = hv_gm_ptr(r, n, gpa, len);
    if (p) {
        memcpy(out, p, len);
        return 0;
    }
    uint64_t cur = gpa, left = len;
    uint8_t *o = out;
    for (int i = 0; i < n && left; i++) {
        if (r[i].gpa <= cur && cur - r[i].gpa < r[i].size) {
            uint64_t k = r[i].size - (cur - r[i].gpa);
            if (k > left)
                k = left;
            memcpy(o, r[i].hva + (cur - r[i].gpa), k);
            o += k;
            cur += k;
            left -= k;
        }
    }
    return left ? -1 : 0;
}
