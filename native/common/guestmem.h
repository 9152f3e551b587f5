/* Guest RAM as the native engines see it: regions of (guest physical
 * address, size, host address), and the checked lookups every guest
 * address goes through. Shared by the NVMe and virtio-blk engines.
 */
#ifndef HVKIT_GUESTMEM_H
#define HVKIT_GUESTMEM_H

#include <stdint.h>

struct hv_region {
    uint64_t gpa, size;
    uint8_t *hva;
};

/* append a region to r[*n] (room for max); 0 or -ENOSPC */
int hv_gm_add(struct hv_region *r, int *n, int max, uint64_t gpa, uint64_t size, uint8_t *hva);
/* the region holding all of [gpa, gpa+len), or -1 */
int hv_gm_index(const struct hv_region *r, int n, uint64_t gpa, uint64_t len);
/* host pointer for [gpa, gpa+len) inside one region, else NULL
 * (GuestMemory.region_of / view) */
uint8_t *hv_gm_ptr(const struct hv_region *r, int n, uint64_t gpa, uint64_t len);
/* copy [gpa, gpa+len) out of guest RAM, possibly across adjacent regions
 * (GuestMemory.read); 0 or -1 if any byte is outside RAM */
int hv_gm_read(const struct hv_region *r, int n, uint64_t gpa, uint64_t len, void *out);

#endif
