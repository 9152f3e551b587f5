/* virtio-blk's request queue in C: the split ring (virtio 1.2, 2.7), the
 * request parser (5.2.6) and the I/O, for a disk on a plain file
 * descriptor.
 *
 * A port of hvkit/devices/virtio/queue.py (Virtqueue: pop, the chain walk,
 * push, needs_interrupt, notification suppression) and blk.py
 * (VirtioBlk._serve/_execute) with the same checks and the same answers;
 * the Python device stays the reference (a property test drives both with
 * the same random descriptor tables) and serves every other backend.
 *
 * Everything the guest wrote is checked before use: the avail index (at
 * most a queue ahead), head and next indexes, chain length (a loop ends),
 * indirect tables, every buffer inside guest RAM, readable buffers before
 * writable ones. A bad chain is returned with length 0; a bad ring stops
 * the queue (vblk_run returns VBLK_BROKEN: the device needs a reset).
 *
 * Threading: one thread owns an engine; set-up calls and vblk_run are
 * never concurrent.
 */
#ifndef HVKIT_VIRTIO_BLK_ENGINE_H
#define HVKIT_VIRTIO_BLK_ENGINE_H

#include <stdint.h>
#include <sys/uio.h>

#include "fileio.h"
#include "guestmem.h"

struct uring;

#define VBLK_MAX_REGIONS 32
#define VBLK_MAX_INDIRECT 4096      /* queue.py MAX_INDIRECT */
#define VBLK_SLOTS 256              /* requests in flight at once */
#define VBLK_SLOT_IOV 256           /* more segments than this: synchronous */
#define VBLK_RING_OPS 256
#define VBLK_PAGE 4096              /* the unit of the written-pages record */

/* request statuses (5.2.6) */
#define VBLK_S_OK 0
#define VBLK_S_IOERR 1
#define VBLK_S_UNSUPP 2

/* vblk_run's answers */
#define VBLK_STOP 1                 /* the stop fd fired */
#define VBLK_BROKEN 2               /* the ring is corrupt: the device needs a reset */

struct vblk_seg {
    uint8_t *hva;
    uint64_t len;
};

/* a read or write whose I/O is in flight */
struct vblk_slot {
    int used;
    uint16_t head;
    uint8_t write;
    uint8_t *status;                /* the status byte in guest RAM */
    uint32_t used_len;
    uint64_t offset, length;
    int niov;
    struct iovec iov[VBLK_SLOT_IOV];
};

struct vblk_stats {
    uint64_t ok, ioerr, unsupp;     /* requests answered with each status */
    uint64_t chain_errors;          /* chains returned with length 0 */
    uint64_t bytes_read, bytes_written;
    uint64_t interrupts;            /* irq_fd writes */
};

/* what vblk_run did and decided (times in ns) */
struct vblk_run_stats {
    uint64_t passes, work_passes, requests, max_pass;
    uint64_t poll_hits;             /* work found while polling (no notification needed) */
    uint64_t sleeps, kicks, timeouts, rearm_saves;
    uint64_t contended;             /* times polling turned to naps (oversubscribed CPUs) */
    uint64_t naps;                  /* timed sleeps instead of spins */
    uint64_t io_waits;              /* blocked on the ring with I/O in flight */
    uint64_t uring_ios, sync_ios;
    uint64_t poll_ns, sleep_ns, io_wait_ns;
    int64_t window_ns, window_min_ns, window_max_ns;
};

struct vblk_engine {
    struct hv_region regions[VBLK_MAX_REGIONS];
    int nregions;
    uint8_t *dirty[VBLK_MAX_REGIONS];   /* per region, a bit per page the engine wrote */
    struct hv_file disk;
    uint8_t serial[20];
    uint32_t max_segments, max_discard_sectors;
    /* the queue (queue.py names) */
    int ready, broken, event_idx, indirect;
    uint32_t size;
    uint8_t *desc, *avail, *used;
    uint16_t last_avail, used_idx, signalled;
    int notify_off;                 /* we asked the driver not to notify (polling) */
    /* scratch for one chain's buffers */
    struct vblk_seg *rd, *wr;
    size_t seg_cap;
    /* I/O */
    struct uring *uring;
    struct vblk_slot *slots;
    int free_slots[VBLK_SLOTS];
    int nfree;
    int inflight, queued;
    uint8_t *bounce, *zeros;
    int kick_fd, stop_fd, irq_fd;
    int loadavg_fd, poll_always;
    int napping;                    /* the CPUs are oversubscribed: poll by timed sleeps */
    long ncpus;
    int64_t window;
    struct vblk_stats st;
    struct vblk_run_stats rs;
};

int vblk_init(struct vblk_engine *e, int fd, uint64_t size, int read_only, uint32_t align);
void vblk_free(struct vblk_engine *e);
int vblk_enable_uring(struct vblk_engine *e);
int vblk_add_region(struct vblk_engine *e, uint64_t gpa, uint64_t size, uint8_t *hva);
/* the queue's layout and positions (Virtqueue.state()); -EINVAL for a
 * size that is not a power of two, a misaligned ring or one outside RAM */
int vblk_set_queue(struct vblk_engine *e, uint32_t size, uint64_t desc, uint64_t avail,
                   uint64_t used, uint16_t last_avail, uint16_t used_idx, uint16_t signalled,
                   int event_idx, int indirect);
/* serve every available request one at a time, synchronously (the order
 * and answers of the Python device serving its queue on one thread);
 * returns the requests taken, or -1 if the ring broke */
int vblk_process(struct vblk_engine *e);
/* used_event / NO_INTERRUPT: does the driver want an interrupt for what
 * was pushed since the last call? */
int vblk_needs_interrupt(struct vblk_engine *e);
/* the loop: fetch, submit to io_uring, complete, interrupt; poll the avail
 * ring for an adaptive window (the driver told not to notify), then ask
 * for a notification and sleep on kick_fd. Returns VBLK_STOP with nothing
 * in flight, VBLK_BROKEN, or -errno. */
int vblk_run(struct vblk_engine *e, int64_t poll_ns);

#endif
