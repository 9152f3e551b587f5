# Declarations of runloop.h for Cython (the .pxd/.pyx split: C facts here,
# Python-facing code in _native.pyx).
from libc.stdint cimport uint16_t, uint32_t, uint64_t, int64_t

cdef extern from "linux/kvm.h":
    struct kvm_run:
        unsigned char request_interrupt_window
        unsigned char immediate_exit
        unsigned int exit_reason

cdef extern from "runloop.h" nogil:
    enum:
        HV_MAX_PORTS
        HV_EXIT_REASONS
        HV_PORT_SERIAL
        HV_PORT_EXIT
        HV_PORT_NULL
        HV_PORT_CALLBACK
        HV_RUN_EXIT
        HV_RUN_INTERRUPTED
        HV_RUN_GUEST_EXIT
        HV_RUN_CALLBACK_ERROR

    ctypedef struct hv_sink:
        unsigned char *buf
        size_t len
        size_t cap
        size_t limit
        size_t dropped
        size_t fd_dropped
        int fd
        int stalled

    ctypedef struct hv_serial:
        int dlab
        int thri
        int loopback
        int rx_ready
        hv_sink *sink

    ctypedef struct hv_vmstate:
        int exit_requested
        int64_t exit_code
        int exit_vcpu

    ctypedef int (*hv_port_fn)(void *state, void *owner, kvm_run *run, uint32_t off,
                               unsigned char *data) noexcept nogil

    ctypedef struct hv_port:
        uint16_t base
        uint16_t len
        int kind
        void *state
        hv_port_fn fn
        uint64_t hits

    ctypedef struct hv_ports:
        int n
        hv_port ports[32]

    ctypedef struct hv_runner:
        int fd
        int vcpu_id
        kvm_run *run
        size_t map_size
        void *owner
        uint64_t kvm_runs
        uint64_t native_exits
        uint64_t callback_exits
        uint64_t exit_counts[64]

    int hv_sink_init(hv_sink *s, size_t limit)
    void hv_sink_free(hv_sink *s)
    void hv_sink_write(hv_sink *s, const unsigned char *p, size_t n)
    void hv_sink_lock(hv_sink *s)
    void hv_sink_unlock(hv_sink *s)
    int hv_ports_add(hv_ports *ports, uint16_t base, uint16_t len, int kind, void *state)
    int hv_ports_add_callback(hv_ports *ports, uint16_t base, uint16_t len, hv_port_fn fn,
                              void *state)
    int hv_ports_remove(hv_ports *ports, uint16_t base, uint16_t len)
    int hv_io_data_ok(const kvm_run *run, size_t map_size)
    int hv_serve_port(hv_runner *r, kvm_run *run)
    int hv_kick_signal_install()
    int hv_kick_signal()
    void hv_runner_init(hv_runner *r, int fd, int vcpu_id, kvm_run *run,
                        size_t map_size, hv_ports *ports, hv_vmstate *vm)
    void hv_runner_kick(hv_runner *r)
    int hv_run(hv_runner *r)
