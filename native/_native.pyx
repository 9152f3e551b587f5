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
from posix.mman cimport (mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED, MAP_ANONYMOUS,
                         MAP_FAILED)
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from cpython.bytes cimport PyBytes_FromStringAndSize

from runloop cimport *

include "kvm_api.pxi"

from hvkit.errors import KvmError
from hvkit.devices.bus import DeviceReplyError

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


cdef extern from "linux/ioctl.h":
    unsigned int _IOC_SIZE(unsigned long nr)


def ioctl_buf(int fd, unsigned long request, buf, str name):
    """An ioctl whose argument points to ``buf`` (a writable buffer, in/out).

    ``buf`` must hold at least the argument size the request number encodes
    (_IOC_SIZE): the kernel copies that many bytes in or out whatever the
    buffer's length, so a short one would let it write past it."""
    cdef Py_buffer view
    cdef int r
    cdef int err
    cdef size_t need = _IOC_SIZE(request)
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
    try:
        if <size_t>view.len < need:
            raise ValueError(f"{name}: a {view.len}-byte buffer for a {need}-byte argument")
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
        # The lock keeps a vCPU's append (which may move the buffer) out
        # while the bytes are copied.
        with nogil:
            hv_sink_lock(&self.s)
        try:
            return PyBytes_FromStringAndSize(<char *>self.s.buf, self.s.len)
        finally:
            hv_sink_unlock(&self.s)

    def clear(self):
        with nogil:
            hv_sink_lock(&self.s)
            self.s.len = 0
            hv_sink_unlock(&self.s)

    @property
    def fd(self) -> int:
        return self.s.fd

    @fd.setter
    def fd(self, int fd):
        with nogil:
            hv_sink_lock(&self.s)
            self.s.fd = fd
            self.s.stalled = 0
            hv_sink_unlock(&self.s)

    @property
    def dropped(self) -> int:
        """Bytes the in-memory buffer had no room for (past ``limit``)."""
        return self.s.dropped

    @property
    def fd_dropped(self) -> int:
        """Bytes not written to ``fd`` because it stayed full (a console
        pipe nobody reads): dropped so the guest never waits on it."""
        return self.s.fd_dropped

    @property
    def stalled(self) -> bool:
        """True while ``fd`` is full and live output is being dropped."""
        return self.s.stalled != 0

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
        cdef int index = hv_ports_add(&self.ports, base, length, kind, st)
        if index < 0:
            raise ValueError(f"port range {base:#x}+{length} refused")
        return index

    def remove_ports(self, int base, int length) -> int:
        """Stop serving [base, base+length) in C; returns entries removed.
        Exits there go to Python (and the bus) from the next one on."""
        if not (0 <= base and base + length <= 0x10000 and length > 0):
            raise ValueError(f"port range {base:#x}+{length} is outside the I/O space")
        return hv_ports_remove(&self.ports, base, length)

    def add_serial(self, int base, SerialFastPath serial not None) -> int:
        self._keep.append(serial)
        return self._add(base, 8, HV_PORT_SERIAL, &serial.s)

    def add_exit_port(self, int port, int size=4) -> int:
        return self._add(port, size, HV_PORT_EXIT, NULL)

    def add_null_ports(self, int base, int length) -> int:
        return self._add(base, length, HV_PORT_NULL, NULL)

    def add_python_port(self, int base, int length, device, lock, str name="") -> int:
        """Serve [base, base+length) by calling ``device.read(offset, size)``
        and ``device.write(offset, data)`` from the run loop, holding
        ``lock`` (the bus mapping's) around each call. An exception the
        device raises comes out of the vCPU's ``run()``."""
        if self.ports.n >= HV_MAX_PORTS:
            raise ValueError(f"at most {HV_MAX_PORTS} natively served port ranges")
        if not (0 <= base and base + length <= 0x10000 and length > 0):
            raise ValueError(f"port range {base:#x}+{length} is outside the I/O space")
        port = PythonPort(device, lock, name or type(device).__name__, base)
        cdef int index = hv_ports_add_callback(&self.ports, base, length, _python_port_fn,
                                               <void *>port)
        if index < 0:
            raise ValueError(f"port range {base:#x}+{length} refused")
        self._keep.append(port)      # the table holds a borrowed pointer until the VM goes
        return index

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


cdef object _device_name(bus, addr):
    """The name of the device at ``addr`` on ``bus``, for error messages."""
    where = f"{getattr(bus, 'name', type(bus).__name__)} at {addr:#x}"
    find = getattr(bus, "find", None)
    if find is not None:
        try:
            m = find(addr)
        except Exception:
            m = None
        name = getattr(m, "name", None)
        if name:
            return f"{name} ({where})"
    return f"the device on {where}"


cdef object _bad_reply(bus, addr, size_t size, reply):
    return DeviceReplyError(f"{_device_name(bus, addr)} answered a {size}-byte read "
                            f"with {_reply_kind(reply)}; a device read returns exactly "
                            f"{size} bytes")


cdef int _copy_exact(unsigned char *dst, size_t size, reply) except -1:
    """Copy a device's read reply into guest-visible memory if it is exactly
    ``size`` bytes (a short one would hand the guest host heap); returns 1,
    or 0 for a reply of another size or kind (the caller names the device)."""
    cdef const unsigned char[::1] view
    if type(reply) is bytes:
        if <size_t>len(<bytes>reply) != size:
            return 0
        memcpy(dst, <char *><bytes>reply, size)
        return 1
    try:
        view = memoryview(reply).cast("B")
    except (TypeError, ValueError):
        return 0
    if <size_t>view.shape[0] != size:
        return 0
    if size:
        memcpy(dst, &view[0], size)
    return 1


cdef int _copy_reply(unsigned char *dst, bus, addr, size_t size, reply) except -1:
    if not _copy_exact(dst, size, reply):
        raise _bad_reply(bus, addr, size, reply)
    return 0


cdef class VcpuRunner


cdef class PythonPort:
    """A Python device on a port range, served from inside the run loop: the
    vCPU thread takes the GIL only to call the device (under the bus
    mapping's lock, so the device still sees one access at a time), then
    goes straight back into KVM_RUN. Exits skip the trip out of the loop,
    the generic exit decoding and the bus lookup."""
    cdef readonly object device
    cdef readonly str name
    cdef readonly int base
    cdef object _read, _write, _acquire, _release

    def __cinit__(self, device, lock, str name, int base):
        self.device = device
        self.name = name
        self.base = base
        self._read = device.read
        self._write = device.write
        self._acquire = lock.acquire
        self._release = lock.release

    cdef int serve(self, VcpuRunner runner, kvm_run *run, uint32_t off,
                   unsigned char *data) noexcept:
        cdef hv_io_t *io = HV_IO(run)
        cdef uint32_t size = io.size, count = io.count, i
        cdef bint is_out = io.direction == 1
        try:
            self._acquire()
            try:
                if is_out:
                    for i in range(count):
                        self._write(off, PyBytes_FromStringAndSize(
                            <char *>data + <size_t>i * size, size))
                else:
                    for i in range(count):
                        reply = self._read(off, size)
                        if not _copy_exact(data + <size_t>i * size, size, reply):
                            raise DeviceReplyError(
                                f"{self.name} (port {self.base + off:#x}) answered a {size}-byte "
                                f"read with {_reply_kind(reply)}; a device read returns "
                                f"exactly {size} bytes")
            finally:
                self._release()
        except BaseException as exc:
            runner._pending = exc
            return -1
        return 1


cdef object _reply_kind(reply):
    if isinstance(reply, (bytes, bytearray, memoryview)):
        try:
            return f"{memoryview(reply).nbytes} bytes"
        except (TypeError, ValueError):
            pass
    return f"a {type(reply).__name__}"


cdef int _python_port_fn(void *state, void *owner, kvm_run *run, uint32_t off,
                         unsigned char *data) noexcept nogil:
    with gil:
        return (<PythonPort>state).serve(<VcpuRunner>owner, run, off, data)


cdef class VcpuRunner:
    """The kvm_run mapping of one vCPU and its run loop."""
    cdef hv_runner r
    cdef kvm_run *krun
    cdef readonly size_t map_size
    cdef readonly NativeVm vm
    cdef readonly int fd
    cdef object _pending             # a port callback's exception, raised by run()

    def __cinit__(self, int fd, int vcpu_id, size_t map_size, NativeVm vm not None):
        cdef void *p
        if fd >= 0:
            p = mmap(NULL, map_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        else:  # detached: a private kvm_run page for exercising exit handling
            p = mmap(NULL, map_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0)
        if p == MAP_FAILED:
            raise KvmError("mmap(kvm_run)", errno)
        self.krun = <kvm_run *>p
        self.map_size = map_size
        self.vm = vm
        self.fd = fd
        hv_runner_init(&self.r, fd, vcpu_id, self.krun, map_size, &vm.ports, &vm.state)
        self.r.owner = <void *>self

    @classmethod
    def detached(cls, NativeVm vm not None, size_t map_size=3 * 4096):
        """A runner with no vCPU behind it: its kvm_run is plain memory that
        ``write_raw`` forges, so exit handling (``serve_native``,
        ``serve_io``, ``serve_mmio``) can be driven with hostile values."""
        return cls(-1, 0, map_size, vm)

    def __dealloc__(self):
        if self.krun != NULL:
            munmap(self.krun, self.map_size)
            self.krun = NULL

    def run(self) -> int:
        """KVM_RUN until an exit needs Python; the GIL is released throughout."""
        cdef int rc
        if self.fd < 0:
            raise KvmError("KVM_RUN", 9, "a detached runner has no vCPU")
        with nogil:
            rc = hv_run(&self.r)
        if rc == HV_RUN_CALLBACK_ERROR:
            self._raise_pending()
        if rc < 0:
            raise KvmError("KVM_RUN", -rc)
        return rc

    cdef int _raise_pending(self) except -1:
        exc, self._pending = self._pending, None
        if exc is None:
            raise KvmError("KVM_RUN", 5, "a port callback failed without an error")
        raise exc

    def serve_native(self) -> int:
        """Offer the current IO exit to the native port table, as the run
        loop does: 1 served in C, 4 served by a Python port, 2 the guest
        asked to exit, 0 left for Python; a Python port's error is raised."""
        cdef int rc
        with nogil:
            rc = hv_serve_port(&self.r, self.krun)
        if rc == 3:
            self._raise_pending()
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

    @property
    def callback_exits(self) -> int:
        """Exits a Python port (``NativeVm.add_python_port``) served from
        inside the run loop."""
        return self.r.callback_exits

    def exit_counts(self) -> dict:
        return {i: self.r.exit_counts[i] for i in range(HV_EXIT_REASONS)
                if self.r.exit_counts[i]}

    def raw(self, size_t offset, size_t size) -> bytes:
        """A copy of kvm_run bytes (for decoding the less frequent exits)."""
        if offset > self.map_size or size > self.map_size - offset:
            raise ValueError("outside the kvm_run mapping")
        return PyBytes_FromStringAndSize(<char *>self.krun + offset, size)

    def write_raw(self, size_t offset, const unsigned char[:] data not None):
        cdef size_t n = data.shape[0]
        if offset > self.map_size or n > self.map_size - offset:
            raise ValueError("outside the kvm_run mapping")
        if n:
            memcpy(<char *>self.krun + offset, &data[0], n)

    def io(self):
        """(is_out, size, port, count) of the current IO exit."""
        cdef hv_io_t *io = HV_IO(self.krun)
        return io.direction == 1, io.size, io.port, io.count

    def serve_io(self, bus):
        """Resolve the current IO exit through ``bus`` (Python devices).

        Every read reply must be exactly the access size (bytes-like);
        anything else raises DeviceReplyError naming the device."""
        cdef hv_io_t *io = HV_IO(self.krun)
        if not hv_io_data_ok(self.krun, self.map_size):
            raise KvmError("KVM_RUN", 22, f"IO exit data outside kvm_run (size {io.size}, "
                           f"count {io.count}, offset {io.data_offset:#x})")
        cdef unsigned char *data = <unsigned char *>self.krun + io.data_offset
        cdef uint32_t size = io.size, count = io.count, i
        cdef uint16_t port = io.port
        if io.direction == 1:
            for i in range(count):
                bus.write(port, PyBytes_FromStringAndSize(<char *>data + <size_t>i * size, size))
        else:
            for i in range(count):
                _copy_reply(data + <size_t>i * size, bus, port, size, bus.read(port, size))

    cdef uint32_t _mmio_len(self) except 0:
        cdef hv_mmio_t *m = HV_MMIO(self.krun)
        if m.len == 0 or m.len > 8:
            raise KvmError("KVM_RUN", 22, f"MMIO exit of {m.len} bytes (1 to 8 fit kvm_run)")
        return m.len

    def mmio(self):
        """(phys_addr, length, is_write, data) of the current MMIO exit."""
        cdef hv_mmio_t *m = HV_MMIO(self.krun)
        cdef uint32_t n = self._mmio_len()
        return m.phys_addr, n, m.is_write != 0, PyBytes_FromStringAndSize(<char *>m.data, n)

    def serve_mmio(self, bus):
        """Resolve the current MMIO exit through ``bus``; read replies are
        checked as in ``serve_io``."""
        cdef hv_mmio_t *m = HV_MMIO(self.krun)
        cdef uint32_t n = self._mmio_len()
        if m.is_write:
            bus.write(m.phys_addr, PyBytes_FromStringAndSize(<char *>m.data, n))
        else:
            _copy_reply(m.data, bus, m.phys_addr, n, bus.read(m.phys_addr, n))
