# cython: language_level=3, boundscheck=False, wraparound=False
"""virtio-blk's request queue in C (blk_engine.c), for Python.

``BlkEngine`` serves one virtio-blk queue on a plain file descriptor:
``process()`` serves what is available synchronously (for tests and the
comparison with the Python device), ``run()`` is the loop that polls the
avail ring, runs the I/O through io_uring and sleeps on the kick eventfd,
without the GIL, until the stop eventfd fires or the ring breaks.

Buffers handed in (guest RAM mappings) are pinned by the engine for its
lifetime; the fds stay the caller's.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memset

cdef extern from "blk_engine.h":
    int VBLK_STOP, VBLK_BROKEN
    struct hv_file:
        int fd
        uint64_t size
        int read_only
        uint32_t align
    struct vblk_stats:
        uint64_t ok, ioerr, unsupp, chain_errors, bytes_read, bytes_written, interrupts
    struct vblk_run_stats:
        uint64_t passes, work_passes, requests, max_pass, poll_hits
        uint64_t sleeps, kicks, timeouts, rearm_saves, contended, naps, io_waits
        uint64_t uring_ios, sync_ios, poll_ns, sleep_ns, io_wait_ns
        int64_t window_ns, window_min_ns, window_max_ns
    struct hv_region:
        uint64_t gpa, size
    struct vblk_engine:
        hv_region regions[32]
        int nregions
        uint8_t *dirty[32]
        hv_file disk
        uint8_t serial[20]
        uint32_t max_segments, max_discard_sectors
        int ready, broken, event_idx, indirect
        uint32_t size
        uint16_t last_avail, used_idx, signalled
        void *uring
        int inflight
        int kick_fd, stop_fd, irq_fd
        int poll_always
        vblk_stats st
        vblk_run_stats rs
    int vblk_init(vblk_engine *e, int fd, uint64_t size, int read_only, uint32_t align)
    void vblk_free(vblk_engine *e)
    int vblk_enable_uring(vblk_engine *e)
    int vblk_add_region(vblk_engine *e, uint64_t gpa, uint64_t size, uint8_t *hva)
    int vblk_set_queue(vblk_engine *e, uint32_t size, uint64_t desc, uint64_t avail,
                       uint64_t used, uint16_t last_avail, uint16_t used_idx,
                       uint16_t signalled, int event_idx, int indirect)
    int vblk_process(vblk_engine *e) nogil
    int vblk_needs_interrupt(vblk_engine *e)
    int vblk_run(vblk_engine *e, int64_t poll_ns) nogil

RUN_STOP = VBLK_STOP
RUN_BROKEN = VBLK_BROKEN


cdef class BlkEngine:
    """The C virtio-blk queue engine on ``fd`` (``size`` bytes, O_DIRECT
    with ``align`` > 1)."""

    cdef vblk_engine *e
    cdef list _keep

    def __cinit__(self):
        self.e = NULL

    def __init__(self, int fd, uint64_t size, bint read_only, uint32_t align=1, *,
                 bytes serial=b"", uint32_t max_segments=32,
                 uint32_t max_discard_sectors=1 << 22):
        self._keep = []
        self.e = <vblk_engine *>malloc(sizeof(vblk_engine))
        if self.e == NULL:
            raise MemoryError()
        rc = vblk_init(self.e, fd, size, read_only, align)
        if rc:
            free(self.e)
            self.e = NULL
            raise OSError(-rc, f"virtio-blk engine: init failed (alignment {align})")
        ident = serial[:20].ljust(20, b"\0")
        for i in range(20):
            self.e.serial[i] = ident[i]
        self.e.max_segments = max_segments
        self.e.max_discard_sectors = max_discard_sectors

    def __dealloc__(self):
        if self.e != NULL:
            vblk_free(self.e)
            free(self.e)
            self.e = NULL

    def add_region(self, uint64_t gpa, uint64_t size, mapping):
        """Guest RAM [gpa, gpa+size) at the start of ``mapping`` (a
        writable buffer of at least ``size`` bytes)."""
        cdef uint8_t[::1] view = memoryview(mapping).cast("B")
        if <uint64_t>view.shape[0] < size or view.shape[0] == 0:
            raise ValueError(f"mapping of {view.shape[0]} bytes for a region of {size}")
        self._keep.append(view)
        if vblk_add_region(self.e, gpa, size, &view[0]):
            raise ValueError("too many memory regions")

    def enable_uring(self) -> bool:
        """Reads and writes through io_uring, many in flight; False if the
        kernel refuses (they then stay synchronous)."""
        return vblk_enable_uring(self.e) == 0

    def set_queue(self, uint32_t size, uint64_t desc, uint64_t avail, uint64_t used,
                  uint16_t last_avail, uint16_t used_idx, uint16_t signalled,
                  bint event_idx, bint indirect):
        """The queue's layout and positions, as Virtqueue.state() has them."""
        if vblk_set_queue(self.e, size, desc, avail, used, last_avail, used_idx, signalled,
                          event_idx, indirect):
            raise ValueError(f"virtio-blk engine: queue of {size} at {desc:#x}/{avail:#x}/"
                             f"{used:#x} is not usable")

    def set_fds(self, int kick_fd, int stop_fd, int irq_fd):
        self.e.kick_fd = kick_fd
        self.e.stop_fd = stop_fd
        self.e.irq_fd = irq_fd

    @property
    def poll_always(self):
        return bool(self.e.poll_always)

    @poll_always.setter
    def poll_always(self, bint value):
        self.e.poll_always = value

    @property
    def uring(self) -> bool:
        return self.e.uring != NULL

    @property
    def broken(self) -> bool:
        return bool(self.e.broken)

    @property
    def positions(self):
        """(last_avail, used_idx, signalled): where the queue stands."""
        return (self.e.last_avail, self.e.used_idx, self.e.signalled)

    def process(self) -> int:
        """Serve what is available, one request at a time; -1: the ring broke."""
        with nogil:
            n = vblk_process(self.e)
        return n

    def take_written(self) -> list:
        """Guest-physical addresses of the pages the engine wrote (data
        read from the disk, statuses, the used ring) since the last call:
        KVM's dirty log does not see them."""
        cdef list out = []
        cdef int i
        cdef uint64_t k, pages
        cdef uint8_t *bits
        for i in range(self.e.nregions):
            bits = self.e.dirty[i]
            if bits == NULL:
                continue
            pages = (self.e.regions[i].size + 4095) // 4096
            for k in range(pages):
                if bits[k // 8] & (1 << (k % 8)):
                    out.append(self.e.regions[i].gpa + k * 4096)
            memset(bits, 0, (pages + 7) // 8)
        return out

    def needs_interrupt(self) -> bool:
        return bool(vblk_needs_interrupt(self.e))

    def run(self, int64_t poll_ns) -> int:
        """The loop, without the GIL: RUN_STOP, RUN_BROKEN or -errno."""
        with nogil:
            r = vblk_run(self.e, poll_ns)
        return r

    @property
    def stats(self):
        s = self.e.st
        return {"ok": s.ok, "ioerr": s.ioerr, "unsupp": s.unsupp,
                "chain_errors": s.chain_errors, "bytes_read": s.bytes_read,
                "bytes_written": s.bytes_written, "interrupts": s.interrupts}

    @property
    def run_stats(self):
        r = self.e.rs
        return {"passes": r.passes, "work_passes": r.work_passes, "requests": r.requests,
                "max_pass": r.max_pass, "poll_hits": r.poll_hits, "sleeps": r.sleeps,
                "kicks": r.kicks, "timeouts": r.timeouts, "rearm_saves": r.rearm_saves,
                "contended": r.contended, "naps": r.naps, "io_waits": r.io_waits,
                "uring_ios": r.uring_ios, "sync_ios": r.sync_ios,
                "poll_us": r.poll_ns // 1000, "sleep_us": r.sleep_ns // 1000,
                "io_wait_us": r.io_wait_ns // 1000, "window_us": r.window_ns / 1000,
                "window_min_us": r.window_min_ns / 1000,
                "window_max_us": r.window_max_ns / 1000}
