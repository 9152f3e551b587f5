/* The vCPU run loop and the devices served in it without Python.
 *
 * Python owns every decision; this file only moves bytes on the exits that
 * are too frequent to pay for a trip into the interpreter: the console
 * transmit path, the exit port, and ports whose writes are ignored. */
#ifndef HVKIT_RUNLOOP_H
#define HVKIT_RUNLOOP_H

#include <stddef.h>
#include <stdint.h>
#include <pthread.h>
#include <linux/kvm.h>

#define HV_MAX_PORTS 32
#define HV_EXIT_REASONS 64

enum hv_port_kind {
    HV_PORT_REMOVED = 0,  /* taken off the bus: the slot stays, never matches */
    HV_PORT_SERIAL = 1,   /* 16550: THR writes and LSR reads */
    HV_PORT_EXIT = 2,     /* a write stops the VM with the value as exit code */
    HV_PORT_NULL = 3,     /* writes dropped, reads return zeros (counted) */
    HV_PORT_CALLBACK = 4, /* a Python device: fn is called in the loop (it takes the GIL) */
};

enum hv_run_result {
    HV_RUN_EXIT = 0,       /* an exit for Python: look at kvm_run */
    HV_RUN_INTERRUPTED = 1,/* kicked (immediate_exit or a signal) */
    HV_RUN_GUEST_EXIT = 2, /* the guest wrote the exit port */
    HV_RUN_CALLBACK_ERROR = 3, /* a port callback failed: its owner holds the error */
};

/* How long one console write may wait for a full fd before the sink
 * declares it stalled; while stalled, live output that does not fit at once
 * is dropped (and counted), so a console nobody drains never blocks a vCPU. */
#define HV_SINK_STALL_MS 50

typedef struct hv_sink {
    pthread_mutex_t lock;
    unsigned char *buf;
    size_t len, cap, limit;
    size_t dropped;       /* bytes the in-memory buffer had no room for */
    size_t fd_dropped;    /* bytes the live fd could not take in time */
    int fd;               /* also written here live when >= 0 */
    int stalled;          /* the fd stayed full for HV_SINK_STALL_MS */
} hv_sink;

typedef struct hv_serial {
    volatile int dlab;    /* LCR bit 7: offsets 0/1 are the divisor */
    volatile int thri;    /* IER bit 1: THR writes must raise an interrupt */
    volatile int loopback;/* MCR bit 4: output goes back to the receiver */
    volatile int rx_ready;/* LSR.DR: Python has input queued */
    hv_sink *sink;
} hv_serial;

typedef struct hv_vmstate {
    volatile int exit_requested;
    volatile int64_t exit_code;
    volatile int exit_vcpu;
} hv_vmstate;

struct hv_runner;

/* Serves one IO exit at offset ``off`` of a HV_PORT_CALLBACK range (the
 * access lies wholly inside it and its data inside kvm_run): 1 served, -1
 * failed (the callback left the error with the runner's owner). */
typedef int (*hv_port_fn)(void *state, void *owner, struct kvm_run *run, uint32_t off,
                          unsigned char *data);

typedef struct hv_port {
    uint16_t base, len;
    int kind;
    void *state;
    hv_port_fn fn;
    volatile uint64_t hits;
} hv_port;

typedef struct hv_ports {
    int n;
    hv_port ports[HV_MAX_PORTS];
} hv_ports;

typedef struct hv_runner {
    int fd;
    int vcpu_id;
    struct kvm_run *run;
    size_t map_size;      /* bytes of the kvm_run mapping: bounds io.data_offset */
    hv_ports *ports;
    hv_vmstate *vm;
    void *owner;          /* passed to port callbacks (the Python runner) */
    pthread_mutex_t lock;
    pthread_t thread;
    int in_run;
    uint64_t kvm_runs;
    uint64_t native_exits;
    uint64_t callback_exits;  /* served by a port callback without leaving the loop */
    uint64_t exit_counts[HV_EXIT_REASONS];
} hv_runner;

int hv_sink_init(hv_sink *s, size_t limit);
void hv_sink_free(hv_sink *s);
void hv_sink_write(hv_sink *s, const unsigned char *p, size_t n);
void hv_sink_lock(hv_sink *s);
void hv_sink_unlock(hv_sink *s);
/* Append a port range to the table (visible to running vCPUs at once);
 * returns its index, or -1 if the table is full or the range invalid. */
int hv_ports_add(hv_ports *ports, uint16_t base, uint16_t len, int kind, void *state);
/* The same for a HV_PORT_CALLBACK range served by fn(state, ...). */
int hv_ports_add_callback(hv_ports *ports, uint16_t base, uint16_t len, hv_port_fn fn,
                          void *state);
/* Stop serving the range [base, base+len) in C (running vCPUs see it at
 * once; the slot is not reused, so a vCPU reading it stays safe); returns
 * how many entries were removed. */
int hv_ports_remove(hv_ports *ports, uint16_t base, uint16_t len);

int hv_kick_signal_install(void);
int hv_kick_signal(void);
void hv_runner_init(hv_runner *r, int fd, int vcpu_id, struct kvm_run *run,
                    size_t map_size, hv_ports *ports, hv_vmstate *vm);
/* Whether an IO exit's data (size * count bytes at data_offset) lies inside
 * the map_size-byte kvm_run mapping and size is 1, 2 or 4. */
int hv_io_data_ok(const struct kvm_run *run, size_t map_size);
/* Serve one port exit natively: 1 handled in C, 4 handled by a port
 * callback, 2 the VM must stop, 3 a callback failed, 0 for Python.
 * Exposed for tests that drive it with a forged kvm_run. */
int hv_serve_port(hv_runner *r, struct kvm_run *run);
void hv_runner_kick(hv_runner *r);
/* Loops on KVM_RUN; returns an hv_run_result or -errno. Call without the GIL. */
int hv_run(hv_runner *r);

#endif
