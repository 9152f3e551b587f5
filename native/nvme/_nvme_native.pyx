# cython: language_level=3, boundscheck=False, wraparound=False
"""The NVMe accelerator's I/O queue engine in C (engine.c), for Python.

``NativeEngine`` offers the control-plane methods of
``hvkit.devices.nvme.engine.QueueEngine`` (create_cq, create_sq, set_dbbuf,
recover, ...) and a ``run`` loop that polls the queues, runs the commands
against file descriptors and sleeps on the kick eventfd, all without the
GIL, returning when the control socket has a message for Python.

Buffers handed in (guest RAM mappings, the control page) are pinned by the
engine for its lifetime.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy

cdef extern from "engine.h":
    int NVME_MAX_QID
    int NVME_QID_LIMIT
    struct nvme_sq:
        int used
        uint16_t qid, cqid
        uint64_t gpa
        uint32_t size, head, tail
    struct nvme_cq:
        int used
        uint16_t qid
        uint64_t gpa
        uint32_t size, head, tail, phase, vector
        int ien
        uint32_t pending_irq
        int blocked
    struct nvme_stats:
        uint64_t bytes_read, bytes_written, read_commands, write_commands, media_errors
    struct nvme_run_stats:
        uint64_t passes, work_passes, commands, max_pass, poll_hits, poll_expired, preempted
        uint64_t rearm_saves, kicks, timeouts, grows, shrinks, contended
        uint64_t work_ns, io_ns, poll_ns, sleep_ns
        int64_t window_ns, window_min_ns, window_max_ns
    struct nvme_engine:
        nvme_run_stats rs
        nvme_sq *sqs
        nvme_cq *cqs
        uint16_t *sq_order
        int nsq
        uint16_t *cq_order
        int ncq
        int dbbuf
        int poll_always
        uint64_t shadow_gpa, eventidx_gpa
        uint32_t coalesce_threshold
        int *irq_fds
        int nirq
        int kick_fd, ctrl_fd
        nvme_stats stats
        uint64_t shadow_errors
        uint64_t ring_errors
        void *uring
        uint64_t batches, batched_ios
        int nregions
        int nns

    int nvme_engine_init(nvme_engine *e, uint8_t *page, uint64_t max_transfer)
    int nvme_enable_uring(nvme_engine *e)
    void nvme_engine_free(nvme_engine *e)
    int nvme_add_region(nvme_engine *e, uint64_t gpa, uint64_t size, uint8_t *hva)
    int nvme_add_ns(nvme_engine *e, uint32_t nsid, int fd, int lba_shift, uint64_t size,
                    int read_only, uint32_t align)
    int nvme_create_cq(nvme_engine *e, uint16_t qid, uint64_t gpa, uint32_t size,
                       uint32_t vector, int ien, uint32_t tail, uint32_t phase)
    int nvme_create_sq(nvme_engine *e, uint16_t qid, uint64_t gpa, uint32_t size,
                       uint16_t cqid, uint32_t head)
    void nvme_delete_sq(nvme_engine *e, uint16_t qid)
    void nvme_delete_cq(nvme_engine *e, uint16_t qid)
    void nvme_reset(nvme_engine *e)
    void nvme_set_dbbuf(nvme_engine *e, uint64_t shadow, uint64_t eventidx, int initialise)
    void nvme_set_coalescing(nvme_engine *e, uint32_t threshold)
    void nvme_disable_coalescing(nvme_engine *e, uint32_t vector)
    void nvme_recover(nvme_engine *e)
    void nvme_flush_interrupts(nvme_engine *e)
    void nvme_update_event_indexes(nvme_engine *e)
    int nvme_has_work(nvme_engine *e)
    void nvme_publish_counters(nvme_engine *e)
    int nvme_process(nvme_engine *e, int budget) nogil
    int nvme_pump(nvme_engine *e, int budget) nogil
    void nvme_drain(nvme_engine *e) nogil
    int nvme_inflight(nvme_engine *e)
    uint16_t nvme_execute(nvme_engine *e, const uint8_t *sqe) nogil
    int nvme_run(nvme_engine *e, int64_t poll_ns) nogil

CTRL_PAGE_SIZE = 8192
RUN_CONTROL = 1


cdef uint8_t *_writable(object buf, list keep, size_t need) except NULL:
    cdef uint8_t[::1] view = memoryview(buf).cast("B")
    if <size_t>view.shape[0] < need:
        raise ValueError(f"buffer of {view.shape[0]} bytes, need {need}")
    if view.shape[0] == 0:
        raise ValueError("empty buffer")
    keep.append(view)
    return &view[0]


cdef class NativeEngine:
    """The C queue engine. ``page``: the 8 KiB control page (writable
    buffer); ``max_transfer``: the controller's MDTS in bytes."""

    cdef nvme_engine *e
    cdef list _keep
    cdef int *_irq
    cdef readonly object namespaces

    def __cinit__(self):
        self.e = NULL
        self._irq = NULL

    def __init__(self, page, uint64_t max_transfer):
        self._keep = []
        self.namespaces = {}
        cdef uint8_t *p = _writable(page, self._keep, CTRL_PAGE_SIZE)
        self.e = <nvme_engine *>malloc(sizeof(nvme_engine))
        if self.e == NULL:
            raise MemoryError()
        rc = nvme_engine_init(self.e, p, max_transfer)
        if rc:
            free(self.e)
            self.e = NULL
            raise OSError(-rc, "nvme engine init failed")

    def __dealloc__(self):
        if self.e != NULL:
            nvme_engine_free(self.e)
            free(self.e)
            self.e = NULL
        if self._irq != NULL:
            free(self._irq)
            self._irq = NULL

    # -- set-up -----------------------------------------------------------------

    def add_region(self, uint64_t gpa, uint64_t size, mapping):
        """Guest RAM [gpa, gpa+size) at the start of ``mapping`` (a writable
        buffer of at least ``size`` bytes: this process's mmap of the memfd)."""
        cdef uint8_t *hva = _writable(mapping, self._keep, size)
        if nvme_add_region(self.e, gpa, size, hva):
            raise ValueError("too many memory regions")

    def add_namespace(self, uint32_t nsid, int fd, int lba_shift, uint64_t size,
                      bint read_only, uint32_t align=1):
        """A namespace on a plain fd: pread/pwrite at byte offsets, fdatasync,
        fallocate. ``align`` > 1: the fd is O_DIRECT with that alignment
        (unaligned requests go through a bounce buffer)."""
        if lba_shift not in (9, 12):
            raise ValueError(f"LBA shift {lba_shift}")
        if nvme_add_ns(self.e, nsid, fd, lba_shift, size, read_only, align):
            raise ValueError(f"namespace {nsid}: too many namespaces or a bad alignment {align}")
        self.namespaces[nsid] = (fd, lba_shift, size, read_only, align)

    def enable_uring(self):
        """Run batches of reads/writes (several commands fetched in one
        pass) concurrently through io_uring; False if the kernel refuses
        (I/O then stays synchronous)."""
        return nvme_enable_uring(self.e) == 0

    @property
    def poll_always(self):
        """Poll within the window even when the host has more runnable
        threads than CPUs (default False: then the loop sleeps on the kick,
        since spinning would take the core the vCPU needs)."""
        return bool(self.e.poll_always)

    @poll_always.setter
    def poll_always(self, bint value):
        self.e.poll_always = value

    @property
    def uring(self):
        return self.e.uring != NULL

    @property
    def batches(self):
        """(batches run through io_uring, commands in them)."""
        return (self.e.batches, self.e.batched_ios)

    def set_fds(self, int kick_fd, int ctrl_fd, irq_fds):
        cdef int n = len(irq_fds)
        cdef int *arr = <int *>malloc(sizeof(int) * (n if n else 1))
        if arr == NULL:
            raise MemoryError()
        for i in range(n):
            arr[i] = irq_fds[i]
        if self._irq != NULL:
            free(self._irq)
        self._irq = arr
        self.e.irq_fds = arr
        self.e.nirq = n
        self.e.kick_fd = kick_fd
        self.e.ctrl_fd = ctrl_fd

    # -- control plane (QueueEngine's names) ------------------------------------------

    def create_cq(self, qid, uint64_t gpa, uint32_t size, uint32_t vector, bint ien,
                  uint32_t tail=0, uint32_t phase=1):
        if not 0 <= qid < NVME_QID_LIMIT or size < 1:
            raise ValueError(f"CQ {qid} of {size} entries")
        if nvme_create_cq(self.e, qid, gpa, size, vector, ien, tail, phase):
            raise ValueError(f"CQ {qid} of {size} entries: tail {tail}, phase {phase}")

    def create_sq(self, qid, uint64_t gpa, uint32_t size, cqid, uint32_t head=0):
        if not 0 <= qid < NVME_QID_LIMIT or not 0 <= cqid < NVME_QID_LIMIT or size < 1:
            raise ValueError(f"SQ {qid} of {size} entries on CQ {cqid}")
        rc = nvme_create_sq(self.e, qid, gpa, size, cqid, head)
        if rc == -22:
            raise ValueError(f"SQ {qid} of {size} entries: head {head}")
        if rc:
            raise KeyError(cqid)

    def delete_sq(self, qid):
        if 0 <= qid < NVME_QID_LIMIT:
            nvme_delete_sq(self.e, qid)

    def delete_cq(self, qid):
        if 0 <= qid < NVME_QID_LIMIT:
            nvme_delete_cq(self.e, qid)

    def reset(self):
        nvme_reset(self.e)

    def set_dbbuf(self, uint64_t shadow_gpa, uint64_t eventidx_gpa, bint initialise=True):
        nvme_set_dbbuf(self.e, shadow_gpa, eventidx_gpa, initialise)

    def set_coalescing(self, uint32_t threshold, disabled_vectors=()):
        nvme_set_coalescing(self.e, threshold)
        for v in disabled_vectors:
            if 0 <= v < NVME_QID_LIMIT:
                nvme_disable_coalescing(self.e, v)

    def recover(self):
        nvme_recover(self.e)

    def flush_interrupts(self):
        nvme_flush_interrupts(self.e)

    def update_event_indexes(self):
        nvme_update_event_indexes(self.e)

    def has_work(self):
        return bool(nvme_has_work(self.e))

    def publish_counters(self):
        nvme_publish_counters(self.e)

    # -- the data path -------------------------------------------------------------------

    def process(self, budget=None):
        """One engine pass (QueueEngine.process for all SQs); the count."""
        cdef int b = -1 if budget is None else budget
        cdef int done
        with nogil:
            done = nvme_process(self.e, b)
        if done:
            nvme_publish_counters(self.e)
        return done

    def pump(self, budget=None):
        """One step of the run loop's pipeline: fetch and start what the
        SQs hold, post what is done (in fetch order); fetched + posted."""
        cdef int b = -1 if budget is None else budget
        cdef int done
        with nogil:
            done = nvme_pump(self.e, b)
        nvme_publish_counters(self.e)
        return done

    def drain(self):
        """Wait for the pipeline's I/O and post its completions."""
        with nogil:
            nvme_drain(self.e)
        nvme_flush_interrupts(self.e)
        nvme_publish_counters(self.e)

    @property
    def inflight(self):
        """Commands the pipeline fetched and has not completed."""
        return nvme_inflight(self.e)

    def execute(self, const uint8_t[::1] sqe):
        """Run one 64-byte I/O command; the NVMe status (without DNR)."""
        if sqe.shape[0] != 64:
            raise ValueError("an SQE is 64 bytes")
        cdef uint16_t st
        with nogil:
            st = nvme_execute(self.e, &sqe[0])
        return st

    def run(self, uint64_t poll_us):
        """Serve the queues until the control fd is readable (returns
        RUN_CONTROL); the GIL is released meanwhile."""
        cdef int rc
        cdef int64_t poll_ns = poll_us * 1000
        if self.e.kick_fd < 0 or self.e.ctrl_fd < 0:
            raise ValueError("set_fds first")
        with nogil:
            rc = nvme_run(self.e, poll_ns)
        if rc < 0:
            raise OSError(-rc, "nvme engine: poll failed")
        return rc

    # -- state ---------------------------------------------------------------------------

    @property
    def dbbuf(self):
        if not self.e.dbbuf:
            return None
        return (self.e.shadow_gpa, self.e.eventidx_gpa)

    @property
    def coalesce_threshold(self):
        return self.e.coalesce_threshold

    @property
    def sq_ids(self):
        return [self.e.sq_order[i] for i in range(self.e.nsq)]

    @property
    def cq_ids(self):
        return [self.e.cq_order[i] for i in range(self.e.ncq)]

    def sq_state(self, qid):
        """(gpa, size, cqid, head, tail) of an SQ."""
        if not 0 <= qid < NVME_QID_LIMIT:
            raise KeyError(qid)
        cdef nvme_sq *sq = &self.e.sqs[qid]
        if not sq.used:
            raise KeyError(qid)
        return (sq.gpa, sq.size, sq.cqid, sq.head, sq.tail)

    def cq_state(self, qid):
        """(gpa, size, vector, ien, head, tail, phase, pending_irq, blocked)."""
        if not 0 <= qid < NVME_QID_LIMIT:
            raise KeyError(qid)
        cdef nvme_cq *cq = &self.e.cqs[qid]
        if not cq.used:
            raise KeyError(qid)
        return (cq.gpa, cq.size, cq.vector, bool(cq.ien), cq.head, cq.tail, cq.phase,
                cq.pending_irq, bool(cq.blocked))

    @property
    def stats(self):
        s = self.e.stats
        return {"bytes_read": s.bytes_read, "bytes_written": s.bytes_written,
                "read_commands": s.read_commands, "write_commands": s.write_commands,
                "media_errors": s.media_errors}

    @property
    def run_stats(self):
        """What the run loop did and how its poll window moved (times in
        ns): passes, commands per pass, polls that found work, windows that
        ran out, preemptions, kicks, the window's current/min/max."""
        r = self.e.rs
        return {"passes": r.passes, "work_passes": r.work_passes, "commands": r.commands,
                "max_pass": r.max_pass, "poll_hits": r.poll_hits,
                "poll_expired": r.poll_expired, "preempted": r.preempted,
                "rearm_saves": r.rearm_saves, "kicks": r.kicks, "timeouts": r.timeouts,
                "window_grows": r.grows, "window_shrinks": r.shrinks, "contended": r.contended,
                "work_ns": r.work_ns, "io_ns": r.io_ns, "poll_ns": r.poll_ns,
                "sleep_ns": r.sleep_ns, "window_ns": r.window_ns,
                "window_min_ns": r.window_min_ns, "window_max_ns": r.window_max_ns}

    @property
    def shadow_errors(self):
        return self.e.shadow_errors

    @property
    def ring_errors(self):
        return self.e.ring_errors
