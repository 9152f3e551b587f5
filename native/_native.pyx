# cython: language_level=3, boundscheck=False, wraparound=False
"""hvkit's native KVM boundary.

A thin layer: raw ioctls on byte buffers (struct layouts live in Python,
checked against the C sizes exported here), the kvm_run mapping, and the
run loop that serves hot ports in C with the GIL released.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.errno cimport errno
from libc.string cimport memcpy, memset
from posix.ioctl cimport ioctl
from posix.mman cimport mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED, MAP_FAILED
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from cpython.bytes cimport PyBytes_FromStringAndSize

from runloop cimport *

include "kvm_api.pxi"

from hvkit.errors import KvmError

RUN_EXIT = HV_RUN_EXIT
RUN_INTERRUPTED = HV_RUN_INTERRUPTED
RUN_GUEST_EXIT = HV_RUN_GUEST_EXIT
MAX_NATIVE_PORTS = HV_MAX_PORTS


cdef extern from *:
    """
    #include <linux/kvm.h>
    #define HV_IO(r) (&(r)->io)
    #define HV_MMIO(r) (&(r)->mmio)
    typedef __typeof__(((struct kvm_run *)0)->io) hv_io_t;
    typedef __typeof__(((struct kvm_run *)0)->mmio) hv_mmio_t;
    """
    ctypedef struct hv_io_t:
        uint8_t direction
        uint8_t size
        uint16_t port
        uint32_t count
        uint64_t data_offset
    ctypedef struct hv_mmio_t:
        uint64_t phys_addr
        uint8_t data[8]
        uint32_t len
        uint8_t is_write
    hv_io_t *HV_IO(kvm_run *r)
    hv_mmio_t *HV_MMIO(kvm_run *r)


def ioctl_arg(int fd, unsigned long request, unsigned long arg, str name):
    """An ioctl whose argument is an integer; returns the ioctl's result."""
    cdef int r
    with nogil:
        r = ioctl(fd, request, arg)
    if r < 0:
        raise KvmError(name, errno)
    return r


def ioctl_buf(int fd, unsigned long request, buf, str name):
    """An ioctl whose argument points to ``buf`` (a writable buffer, in/out)."""
    cdef Py_buffer view
    cdef int r
    cdef int err
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
    try:
        with nogil:
            r = ioctl(fd, request, view.buf)
            err = errno
    finally:
        PyBuffer_Release(&view)
    if r < 0:
        raise KvmError(name, err)
    return r


def buffer_address(obj) -> int:
    """Address of the first byte of a buffer (an mmap, a bytearray).

    Valid only while ``obj`` lives and is not resized."""
    cdef Py_buffer view
    PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE)
    cdef size_t addr = <size_t>view.buf
    PyBuffer_Release(&view)
    return addr


def install_kick_signal():
    """Install the no-op handler whose delivery makes KVM_RUN return EINTR."""
    if hv_kick_signal_install() != 0:
        raise OSError(errno, "sigaction for the vCPU kick signal failed")
    return hv_kick_signal()


cdef class ConsoleSink:
    """Where console bytes go: an in-memory buffer, and a file descriptor
    for live output. Written by C (fast path) and Python (slow path) alike,
    under one lock, so bytes keep their order."""
    cdef hv_sink s

    def __cinit__(self, size_t limit=16 << 20):
        hv_sink_init(&self.s, limit)

    def __dealloc__(self):
        hv_sink_free(&self.s)

    def write(self, const unsigned char[:] data not None):
        if data.shape[0]:
            with nogil:
                hv_sink_write(&self.s, &data[0], data.shape[0])

    def getvalue(self) -> bytes:
        return PyBytes_FromStringAndSize(<char *>self.s.buf, self.s.len)

    def clear(self):
        self.s.len = 0

    @property
    def fd(self) -> int:
        return self.s.fd

    @fd.setter
    def fd(self, int fd):
        self.s.fd = fd

    @property
    def dropped(self) -> int:
        return self.s.dropped

    def __len__(self):
        return self.s.len


cdef class SerialFastPath:
    """The 16550 state the C transmit path needs; the Python model keeps it
    current whenever the guest changes LCR, IER, MCR or the receive FIFO."""
    cdef hv_serial s
    cdef readonly ConsoleSink sink

    def __cinit__(self, ConsoleSink sink not None):
        self.sink = sink
        self.s.sink = &sink.s

    property dlab:
        def __get__(self): return self.s.dlab
        def __set__(self, int v): self.s.dlab = v
    property thri:
        def __get__(self): return self.s.thri
        def __set__(self, int v): self.s.thri = v
    property loopback:
        def __get__(self): return self.s.loopback
        def __set__(self, int v): self.s.loopback = v
    property rx_ready:
        def __get__(self): return self.s.rx_ready
        def __set__(self, int v): self.s.rx_ready = v


cdef class NativeVm:
    """Per-VM native state: the table of natively served ports and the
    guest's exit request, shared by all vCPU run loops of the VM."""
    cdef hv_ports ports
    cdef hv_vmstate state
    cdef list _keep

    def __cinit__(self):
        memset(&self.ports, 0, sizeof(self.ports))
        memset(&self.state, 0, sizeof(self.state))
        self._keep = []

    cdef int _add(self, int base, int length, int kind, void *st) except -1:
        if self.ports.n >= HV_MAX_PORTS:
            raise ValueError(f"at most {HV_MAX_PORTS} natively served port ranges")
        if not (0 <= base and base + length <= 0x10000 and length > 0):
            raise ValueError(f"port range {base:#x}+{length} is outside the I/O space")
        cdef hv_port *p = &self.ports.ports[self.ports.n]
        p.base = base
        p.len = length
        p.kind = kind
        p.state = st
        p.hits = 0
        self.ports.n += 1
        return self.ports.n - 1

    def add_serial(self, int base, SerialFastPath serial not None) -> int:
        self._keep.append(serial)
        return self._add(base, 8, HV_PORT_SERIAL, &serial.s)

    def add_exit_port(self, int port, int size=4) -> int:
        return self._add(port, size, HV_PORT_EXIT, NULL)

    def add_null_ports(self, int base, int length) -> int:
        return self._add(base, length, HV_PORT_NULL, NULL)

    def hits(self, int index) -> int:
        if not 0 <= index < self.ports.n:
            raise IndexError(index)
        return self.ports.ports[index].hits

    def request_exit(self, int64_t code, int vcpu=-1):
        self.state.exit_code = code
        self.state.exit_vcpu = vcpu
        self.state.exit_requested = 1

    @property
    def exit_requested(self) -> bool:
        return self.state.exit_requested != 0

    @property
    def exit_code(self) -> int:
        return self.state.exit_code

    @property
    def exit_vcpu(self) -> int:
        return self.state.exit_vcpu

    def reset_exit(self):
        self.state.exit_requested = 0
        self.state.exit_code = 0


cdef class VcpuRunner:
    """The kvm_run mapping of one vCPU and its run loop."""
    cdef hv_runner r
    cdef kvm_run *krun
    cdef size_t map_size
    cdef readonly NativeVm vm
    cdef readonly int fd

    def __cinit__(self, int fd, int vcpu_id, size_t map_size, NativeVm vm not None):
        cdef void *p = mmap(NULL, map_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        if p == MAP_FAILED:
            raise KvmError("mmap(kvm_run)", errno)
        self.krun = <kvm_run *>p
        self.map_size = map_size
        self.vm = vm
        self.fd = fd
        hv_runner_init(&self.r, fd, vcpu_id, self.krun, &vm.ports, &vm.state)

    def __dealloc__(self):
        if self.krun != NULL:
            munmap(self.krun, self.map_size)
            self.krun = NULL

    def run(self) -> int:
        """KVM_RUN until an exit needs Python; the GIL is released throughout."""
        cdef int rc
        with nogil:
            rc = hv_run(&self.r)
        if rc < 0:
            raise KvmError("KVM_RUN", -rc)
        return rc

    def kick(self):
        """Make the vCPU leave KVM_RUN soon, from any thread."""
        hv_runner_kick(&self.r)

    property immediate_exit:
        def __get__(self): return self.krun.immediate_exit
        def __set__(self, int v): self.krun.immediate_exit = v

    property request_interrupt_window:
        def __get__(self): return self.krun.request_interrupt_window
        def __set__(self, int v): self.krun.request_interrupt_window = v

    @property
    def exit_reason(self) -> int:
        return self.krun.exit_reason

    @property
    def kvm_runs(self) -> int:
        return self.r.kvm_runs

    @property
    def native_exits(self) -> int:
        return self.r.native_exits

    def exit_counts(self) -> dict:
        return {i: self.r.exit_counts[i] for i in range(HV_EXIT_REASONS)
                if self.r.exit_counts[i]}

    def raw(self, size_t offset, size_t size) -> bytes:
        """A copy of kvm_run bytes (for decoding the less frequent exits)."""
        if offset + size > self.map_size:
            raise ValueError("outside the kvm_run mapping")
        return PyBytes_FromStringAndSize(<char *>self.krun + offset, size)

    def write_raw(self, size_t offset, const unsigned char[:] data not None):
        if offset + data.shape[0] > self.map_size:
            raise ValueError("outside the kvm_run mapping")
        if data.shape[0]:
            memcpy(<char *>self.krun + offset, &data[0], data.shape[0])

    def io(self):
        """(is_out, size, port, count) of the current IO exit."""
        cdef hv_io_t *io = HV_IO(self.krun)
        return io.direction == 1, io.size, io.port, io.count

    def serve_io(self, bus):
        """Resolve the current IO exit through ``bus`` (Python devices)."""
        cdef hv_io_t *io = HV_IO(self.krun)
        cdef unsigned char *data = <unsigned char *>self.krun + io.data_offset
        cdef uint32_t size = io.size, i
        cdef uint16_t port = io.port
        cdef bytes chunk
        if size * io.count > self.map_size - io.data_offset:
            raise KvmError("KVM_RUN", 22, "IO exit data outside kvm_run")
        if io.direction == 1:
            for i in range(io.count):
                bus.write(port, PyBytes_FromStringAndSize(<char *>data + i * size, size))
        else:
            for i in range(io.count):
                chunk = bus.read(port, size)
                memcpy(data + i * size, <char *>chunk, size)

    def mmio(self):
        """(phys_addr, length, is_write, data) of the current MMIO exit."""
        cdef hv_mmio_t *m = HV_MMIO(self.krun)
        cdef uint32_t n = m.len if m.len <= 8 else 8
        return m.phys_addr, n, m.is_write != 0, PyBytes_FromStringAndSize(<char *>m.data, n)

    def serve_mmio(self, bus):
        cdef hv_mmio_t *m = HV_MMIO(self.krun)
        cdef uint32_t n = m.len if m.len <= 8 else 8
        cdef bytes chunk
        if m.is_write:
            bus.write(m.phys_addr, PyBytes_FromStringAndSize(<char *>m.data, n))
        else:
            chunk = bus.read(m.phys_addr, n)
            memcpy(m.data, <char *>chunk, n)
