"""The NVMe accelerator: a separate process that serves the I/O queues.

Why a process and not a thread: the engine is Python, and a thread in the
VMM would share the GIL with the vCPU threads' exit handling, so every
completion would contend with every MMIO exit. A process has its own
interpreter, runs on its own core, and cannot take the VMM down when it
crashes; the VMM restarts it from the state published in the control page
(see engine.py).

The data path runs in C (``hvkit._nvme_native``, native/nvme/engine.c)
without the GIL whenever every namespace is a plain file descriptor (a
``RawFileBackend``): it polls the rings, checks and runs the commands with
pread/pwrite/fdatasync/fallocate, posts completions and signals the irq
eventfds, and returns to Python only when a control message arrives.
Other backends (block files, guarded backends) keep the Python
``QueueEngine``, which stays the reference. ``HVKIT_NVME_ENGINE`` (or
``Accelerator(engine=...)``) = "auto" (default), "native" (refuse to start
without it) or "python".

The C loop polls the doorbells for an adaptive window after its last
command, and not at all while the host has more runnable threads than CPUs
(a spinning poller then takes the core the vCPU needs to ring it; the
guest's doorbell exits cost less). ``HVKIT_NVME_POLL=always`` polls within
the window regardless, for hosts with a core set aside for it.

The data path never crosses the VMM in steady state (mode c):
  guest writes SQ entries and the shadow doorbell in its RAM (a memfd this
  process maps), rings the MMIO doorbell only when the EventIdx rule says
  so; KVM turns that write into a signal on ``kick_fd`` (an ioeventfd);
  this process fetches, runs and completes the commands in place, and
  signals ``irq_fds[vector]``, which KVM delivers as the MSI-X message
  (an irqfd on the vector's GSI route).
Without a doorbell buffer (mode b) an ioeventfd would lose the value the
guest wrote, so the VMM takes the MMIO exit, stores the value in the
control page and signals ``kick_fd`` itself.

Control messages (JSON over a SOCK_SEQPACKET socketpair, fds by
SCM_RIGHTS) carry the control plane: init, queue creation/deletion,
doorbell buffer, coalescing, reset, flush, restore (after a restart), stop.
"""
from __future__ import annotations

import importlib
import json
import logging
import mmap
import os
import select
import signal
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

from hvkit.devices.nvme.engine import CTRL_PAGE_SIZE, QueueEngine, memory_fence, read_queue_state
from hvkit.errors import ConfigError, HvkitError

if TYPE_CHECKING:
    from hvkit.devices.nvme.controller import NvmeController

log = logging.getLogger(__name__)

MAX_MESSAGE = 1 << 16
ENGINES = ("auto", "native", "python")
CALL_TIMEOUT = 30.0


class AcceleratorError(HvkitError):
    """The accelerator process died or refused a control message."""


# ---------------------------------------------------------------------------
# VMM side
# ---------------------------------------------------------------------------

class Accelerator:
    """The VMM's handle on the accelerator process; also the controller's
    I/O plane. ``kick_fd`` and ``irq_fds`` outlive restarts, so KVM
    ioeventfd/irqfd registrations made once stay valid."""

    def __init__(self, ctrl: "NvmeController", *, poll_us: int = 200,
                 python: str = sys.executable, engine: str | None = None) -> None:
        engine = engine or os.environ.get("HVKIT_NVME_ENGINE", "auto")
        if engine not in ENGINES:
            raise ConfigError(f"nvme accelerator: engine {engine!r} is not one of "
                              f"{', '.join(ENGINES)}")
        for region in ctrl.mem:
            if region.fd < 0:
                raise ConfigError(
                    f"nvme accelerator: memory region {region.name!r} is not memfd-backed, "
                    f"so another process cannot map it")
        missing = [ns.nsid for ns in ctrl.namespaces.values() if ns.spec is None]
        if missing:
            raise ConfigError(
                f"nvme accelerator: namespaces {missing} have no spec telling another "
                f"process how to open their backend")
        self.ctrl = ctrl
        self.poll_us = poll_us
        self.python = python
        self.engine = engine
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.irq_fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                        for _ in range(ctrl.msix.vectors)]
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.restarts = 0
        self.pidfd = -1

    # -- life cycle ------------------------------------------------------------

    def start(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [self.python, "-m", "hvkit.devices.nvme.accelerator", str(child.fileno())],
                pass_fds=(child.fileno(),), close_fds=True,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(
                    p for p in [_package_root(), os.environ.get("PYTHONPATH", "")] if p)})
        finally:
            child.close()
        self.sock = parent
        if self.pidfd >= 0:
            os.close(self.pidfd)
        self.pidfd = os.pidfd_open(self.proc.pid)
        c = self.ctrl
        regions = list(c.mem)
        init = {
            "op": "init",
            "regions": [[r.gpa, r.size] for r in regions],
            "nirq": len(self.irq_fds),
            "namespaces": [[ns.nsid, ns.lba_size, ns.spec[0], ns.spec[1]]
                           for ns in c.namespaces.values()],
            "max_transfer": c.io.max_transfer,
            "poll_us": self.poll_us,
            "engine": self.engine,
        }
        fds = [c.ctrl_page_fd, self.kick_fd, *self.irq_fds, *[r.fd for r in regions]]
        self._call(init, fds)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restart(self) -> None:
        """Replace a dead (or wedged) accelerator. Queue positions come from
        the control page; the new process first recovers completions the old
        one posted but had not yet published, then carries on. Writes it had
        acknowledged were in the host kernel before their completion was
        posted, so they survive the process."""
        self._kill()
        self.restarts += 1
        log.warning("nvme: restarting the accelerator (restart %d)", self.restarts)
        # read first: the new process republishes as it creates queues
        positions = self.positions()
        self.start()
        self.resume_queues(positions)

    def suspend(self) -> None:
        """Stop the process with the VM paused (for a snapshot): what it
        fetched but did not complete is fetched again by the next one."""
        self._kill()

    def positions(self) -> dict[int, tuple[int, int, int]]:
        """(SQ head, CQ tail, CQ phase) of every I/O queue, as published."""
        c = self.ctrl
        return {qid: read_queue_state(c.ctrl_page, qid) for qid in set(c.io_cqs) | set(c.io_sqs)}

    def resume_queues(self, positions: dict[int, tuple[int, int, int]]) -> None:
        """Give a fresh process the controller's I/O queues at ``positions``;
        it first takes in completions posted after the last publish."""
        c = self.ctrl
        # one message, handled between two engine passes: the new process
        # must not look at a doorbell before it knows where they all are
        restore = {
            "op": "restore",
            "cqs": [[qid, gpa, size, iv, ien, positions[qid][1] % size, positions[qid][2] & 1]
                    for qid, (gpa, size, iv, ien) in sorted(c.io_cqs.items())],
            "sqs": [[qid, gpa, size, cqid, positions[qid][0] % size]
                    for qid, (gpa, size, cqid) in sorted(c.io_sqs.items())],
            "dbbuf": list(c.dbbuf) if c.dbbuf is not None else None,
        }
        self._call(restore)
        c.set_coalescing()
        os.eventfd_write(self.kick_fd, 1)

    def _kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def close(self) -> None:
        if self.alive():
            try:
                self._call({"op": "stop"})
                self.proc.wait(timeout=5)
            except (AcceleratorError, subprocess.TimeoutExpired):
                pass
        self._kill()
        for fd in [self.kick_fd, *self.irq_fds, self.pidfd]:
            if fd >= 0:
                os.close(fd)
        self.kick_fd, self.irq_fds, self.pidfd = -1, [], -1

    # -- control messages --------------------------------------------------------

    def _call(self, msg: dict[str, Any], fds: list[int] | None = None) -> dict[str, Any]:
        if self.sock is None:
            raise AcceleratorError("nvme accelerator is not running")
        try:
            data = json.dumps(msg).encode()
            if fds:
                socket.send_fds(self.sock, [data], fds)
            else:
                self.sock.send(data)
            self.sock.settimeout(CALL_TIMEOUT)
            reply = self.sock.recv(MAX_MESSAGE)
        except (OSError, socket.timeout) as exc:
            raise AcceleratorError(f"nvme accelerator: {msg['op']} failed: {exc}") from exc
        if not reply:
            raise AcceleratorError(f"nvme accelerator died during {msg['op']}")
        answer = json.loads(reply)
        if not answer.get("ok"):
            raise AcceleratorError(f"nvme accelerator refused {msg['op']}: {answer.get('error')}")
        return answer

    def call(self, msg: dict[str, Any]) -> dict[str, Any]:
        """A control message; a dead accelerator is restarted and the
        message sent again (the restart replays queue state first)."""
        try:
            return self._call(msg)
        except AcceleratorError:
            if self.alive():
                raise
        self.restart()
        return self._call(msg)

    # -- the IoPlane interface ------------------------------------------------------

    def create_cq(self, qid: int, gpa: int, size: int, vector: int, ien: bool) -> None:
        self.call({"op": "create_cq", "qid": qid, "gpa": gpa, "size": size,
                   "vector": vector, "ien": ien, "tail": 0, "phase": 1})

    def create_sq(self, qid: int, gpa: int, size: int, cqid: int) -> None:
        self.call({"op": "create_sq", "qid": qid, "gpa": gpa, "size": size,
                   "cqid": cqid, "head": 0})

    def delete_sq(self, qid: int) -> None:
        self.call({"op": "delete_sq", "qid": qid})

    def delete_cq(self, qid: int) -> None:
        self.call({"op": "delete_cq", "qid": qid})

    def set_dbbuf(self, shadow: int, eventidx: int) -> None:
        self.call({"op": "dbbuf", "shadow": shadow, "eventidx": eventidx, "initialise": True})

    def set_coalescing(self, threshold: int, disabled_vectors: list[int]) -> None:
        self.call({"op": "coalescing", "threshold": threshold, "disabled": disabled_vectors})

    def reset(self) -> None:
        self.call({"op": "reset"})

    def flush(self) -> None:
        self.call({"op": "flush"})

    def kick(self, qid: int, cq: bool) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            self.restart()
        os.eventfd_write(self.kick_fd, 1)

    def stats(self) -> dict[str, Any]:
        return self.call({"op": "stats"})


def _package_root() -> str:
    import hvkit
    return os.path.dirname(os.path.dirname(os.path.abspath(hvkit.__file__)))


# ---------------------------------------------------------------------------
# accelerator side
# ---------------------------------------------------------------------------

class _Server:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.engine: Any = None          # QueueEngine, or the NativeEngine
        self.native = None               # the NativeEngine when the data path is in C
        self.io = None
        self.namespaces: dict[int, Any] = {}
        self.poll_us = 0
        self.irq_fds: list[int] = []
        self.kick_fd = -1
        self.poll_s = 0.0
        self.running = True

    def init(self, msg: dict[str, Any], fds: list[int]) -> None:
        from hvkit.devices.nvme.io import IoCommandSet
        from hvkit.devices.nvme.namespace import Namespace
        from hvkit.memory.guest import GuestMemory, MemoryRegion

        nirq = msg["nirq"]
        ctrl_fd, self.kick_fd = fds[0], fds[1]
        self.irq_fds = fds[2:2 + nirq]
        region_fds = fds[2 + nirq:]
        mem = GuestMemory()
        for (gpa, size), fd in zip(msg["regions"], region_fds):
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            mem.add_region(MemoryRegion(gpa, size, fd=fd, mapping=mapping, name=f"ram@{gpa:#x}"))
        page = memoryview(mmap.mmap(ctrl_fd, CTRL_PAGE_SIZE))
        namespaces = {}
        for nsid, lba_size, target, kwargs in msg["namespaces"]:
            module, _, name = target.partition(":")
            backend = getattr(importlib.import_module(module), name)(**kwargs)
            namespaces[nsid] = Namespace(nsid, backend, lba_size, spec=(target, kwargs))
        self.namespaces = namespaces
        self.poll_s = msg["poll_us"] / 1e6
        self.poll_us = int(msg["poll_us"])
        choice = msg.get("engine", "auto")
        if choice != "python":
            why = native_unavailable(namespaces)
            if why is None:
                self.native = self.engine = make_native_engine(
                    mem, page, namespaces, msg["max_transfer"])
                self.native.set_fds(self.kick_fd, self.sock.fileno(), self.irq_fds)
                self.native.poll_always = os.environ.get("HVKIT_NVME_POLL") == "always"
                return
            if choice == "native":
                raise ConfigError(f"native NVMe engine unavailable: {why}")
            log.info("accelerator: Python queue engine (%s)", why)
        self.io = IoCommandSet(mem, namespaces, msg["max_transfer"])
        self.engine = QueueEngine(mem, page, lambda _sqid, cmd: self.io.execute(cmd), self._irq)

    def _irq(self, vector: int) -> None:
        if 0 <= vector < len(self.irq_fds):
            os.eventfd_write(self.irq_fds[vector], 1)

    def handle(self, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        op = msg["op"]
        e = self.engine
        if op == "init":
            self.init(msg, fds)
        elif e is None:
            return {"ok": False, "error": "not initialised"}
        elif op == "create_cq":
            e.create_cq(msg["qid"], msg["gpa"], msg["size"], msg["vector"], msg["ien"],
                        tail=msg["tail"], phase=msg["phase"])
        elif op == "create_sq":
            if not self._has_cq(msg["cqid"]):
                return {"ok": False, "error": f"no CQ {msg['cqid']}"}
            e.create_sq(msg["qid"], msg["gpa"], msg["size"], msg["cqid"], head=msg["head"])
        elif op == "delete_sq":
            e.delete_sq(msg["qid"])
        elif op == "delete_cq":
            e.delete_cq(msg["qid"])
        elif op == "dbbuf":
            e.set_dbbuf(msg["shadow"], msg["eventidx"], bool(msg.get("initialise", True)))
        elif op == "coalescing":
            if self.native is not None:
                e.set_coalescing(msg["threshold"], msg["disabled"])
            else:
                e.coalesce_threshold = msg["threshold"]
                e.coalesce_disabled_vectors = set(msg["disabled"])
        elif op == "reset":
            e.reset()
        elif op == "flush":
            for ns in self.namespaces.values():
                if not ns.read_only:
                    ns.backend.flush()
        elif op == "restore":
            for qid, gpa, size, iv, ien, tail, phase in msg["cqs"]:
                e.create_cq(qid, gpa, size, iv, ien, tail=tail, phase=phase)
            for qid, gpa, size, cqid, head in msg["sqs"]:
                if self._has_cq(cqid):
                    e.create_sq(qid, gpa, size, cqid, head=head)
            if msg["dbbuf"] is not None:
                e.set_dbbuf(msg["dbbuf"][0], msg["dbbuf"][1], initialise=False)
            e.recover()
            e.flush_interrupts()
        elif op == "stats" and self.native is not None:
            n = self.native
            st = n.stats
            return {"ok": True, "engine": "native",
                    "bytes_read": st["bytes_read"], "bytes_written": st["bytes_written"],
                    "sqs": sorted(n.sq_ids), "cqs": sorted(n.cq_ids), "dbbuf": n.dbbuf is not None,
                    "sq_heads": {q: n.sq_state(q)[3] for q in n.sq_ids},
                    "cq_tails": {q: n.cq_state(q)[5] for q in n.cq_ids},
                    "uring": n.uring, "batches": list(n.batches), "poll_us": self.poll_us,
                    "run": n.run_stats}
        elif op == "stats":
            st = self.io.stats
            return {"ok": True, "engine": "python", "bytes_read": st.bytes_read, "bytes_written": st.bytes_written,
                    "sqs": sorted(e.sqs), "cqs": sorted(e.cqs), "dbbuf": e.dbbuf is not None,
                    "sq_heads": {q: sq.head for q, sq in e.sqs.items()},
                    "cq_tails": {q: cq.tail for q, cq in e.cqs.items()}}
        elif op == "stop":
            self.running = False
        else:
            return {"ok": False, "error": f"unknown op {op!r}"}
        return {"ok": True}

    def _has_cq(self, cqid: int) -> bool:
        if self.native is not None:
            return cqid in self.native.cq_ids
        return cqid in self.engine.cqs

    def serve_control(self) -> None:
        msg, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_MESSAGE, 64)
        if not msg:
            self.running = False           # the VMM went away
            return
        try:
            reply = self.handle(json.loads(msg), fds)
        except Exception as exc:          # report, keep serving
            log.exception("accelerator: control message failed")
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        self.sock.send(json.dumps(reply).encode())

    def publish(self) -> None:
        st = self.io.stats
        self.engine.publish_counters({
            "bytes_read": st.bytes_read, "bytes_written": st.bytes_written,
            "read_commands": st.read_commands, "write_commands": st.write_commands,
            "media_errors": st.media_errors})

    def run(self) -> None:
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        while self.running and self.engine is None:
            self.serve_control()
        if self.native is not None:
            # the loop in C, without the GIL; back here for control messages
            while self.running:
                self.native.run(self.poll_us)
                self.serve_control()
            return
        kick = self.kick_fd
        poller.register(kick, select.POLLIN)
        last_work = time.monotonic()
        while self.running:
            e = self.engine
            done = e.process()
            if done:
                self.publish()
                last_work = time.monotonic()
            for fd, _ev in poller.poll(0):
                if fd == kick:
                    _drain(kick)
                else:
                    self.serve_control()
            if done or time.monotonic() - last_work < self.poll_s:
                continue                     # busy: keep polling the doorbells
            # going idle: ask for a kick on the next doorbell, then look once
            # more so that a doorbell rung in between is not missed
            e.update_event_indexes()
            memory_fence()
            if e.has_work():
                continue
            for fd, _ev in poller.poll(1000):
                if fd == kick:
                    _drain(kick)
                else:
                    self.serve_control()
            last_work = time.monotonic()


def native_unavailable(namespaces: dict[int, Any]) -> str | None:
    """Why the C engine cannot serve these namespaces (None: it can). It
    needs every backend to be a plain file descriptor with RawFileBackend's
    semantics; a subclass (a guarded or instrumented backend) may add checks
    the C path would skip, so only the exact class qualifies."""
    try:
        import hvkit._nvme_native  # noqa: F401
    except ImportError as exc:
        return f"hvkit._nvme_native does not import ({exc})"
    from hvkit.storage.raw import RawFileBackend
    for nsid, ns in namespaces.items():
        b = ns.backend
        if type(b) is not RawFileBackend:
            return f"namespace {nsid}: backend {type(b).__name__} has no plain fd"
        if getattr(b, "_fd", -1) < 0:
            return f"namespace {nsid}: backend is closed"
    return None


def make_native_engine(mem, page, namespaces: dict[int, Any], max_transfer: int,
                       uring: bool = True):
    """A NativeEngine on ``mem``'s mappings, the control page and the
    namespaces' fds (see ``native_unavailable``). With ``uring``, the reads
    and writes fetched in one pass run concurrently through io_uring
    (completions still posted in fetch order), where the kernel allows."""
    from hvkit._nvme_native import NativeEngine
    eng = NativeEngine(page, max_transfer)
    if uring and not eng.enable_uring():
        log.info("accelerator: no io_uring; synchronous I/O")
    for region in mem:
        eng.add_region(region.gpa, region.size, region.mapping)
    for nsid, ns in namespaces.items():
        b = ns.backend
        eng.add_namespace(nsid, b._fd, ns.lba_shift, b.size, bool(b.read_only),
                          b.align if b.direct else 1)
    return eng


def _drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="nvme-accelerator: %(message)s")
    sock = socket.socket(fileno=int(argv[1]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # the VMM decides when we stop
    _Server(sock).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
