"""The redo journal: a ring of physical transactions of whole metadata
block images.

One physical transaction is a header block (sequence number, the target
and crc32c of every image), the images, and a commit block whose crc32c
covers all of them. It goes to the ring in one write followed by one
flush, and only then are its images written in place, each sealed with the
transaction's sequence number as its generation.

What replay applies is decided by sequence numbers, never by ring
position alone: every sound transaction in the ring with a sequence number
at or above the replay start is a candidate, they are applied in sequence
order, and an image is written only where the block in place is damaged or
carries an older generation, so replay can never roll metadata back. A
transaction is known to be committed when metadata in place carries its
sequence number or a later one, or when a later transaction was written
(each is written only after the one before was flushed). A damaged record
of a committed transaction is recovered from its individually checksummed
images where its header is sound; whatever cannot be recovered is reported
as lost, and ``Volume.open`` refuses the volume until ``check --repair``
has looked at it. A damaged record that nothing shows was committed is a
crash mid-commit: the end of the log.

Two journal superblocks (A/B, highest valid generation wins) record where
replay starts; a checkpoint flushes the in-place metadata and moves that
start, freeing the ring.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from hvkit.storage import metablock as mb
from hvkit.storage.backend import StorageError
from hvkit.storage.hostfile import HostFile, data_extents
from hvkit.storage.superblock import JOURNAL_START, JSB_A, JSB_B, Geometry

_JSB = struct.Struct("<QQI")          # generation, start_seq, start_off
_JHDR = struct.Struct("<QII")         # seq, n_images, reserved
_JENTRY = struct.Struct("<QII")       # target block, crc of image, reserved
_JCOMMIT = struct.Struct("<QII")      # seq, n_images, crc over header + images
MAX_IMAGES = (mb.PAYLOAD - _JHDR.size) // _JENTRY.size  # 253


class JournalError(StorageError):
    """The journal cannot be used (both superblocks bad, transaction too big)."""


@dataclass
class ReplayReport:
    replayed: int = 0
    images: int = 0
    #: images not written because the block in place is as new or newer
    skipped: int = 0
    stopped: str = ""  # why replay ended before the ring's end ("" = clean end)
    first_seq: int = 0
    next_seq: int = 0
    #: damaged records of committed transactions, recovered from their images
    damaged: list[str] = field(default_factory=list)
    #: committed changes the journal cannot give back
    lost: list[str] = field(default_factory=list)


@dataclass
class JournalTxn:
    """A transaction found in the ring (whole, or the intact images of a
    damaged record of a committed one)."""

    seq: int
    offset: int
    images: list[tuple[int, bytes]]


@dataclass
class ScanResult:
    txns: list[JournalTxn]       # to replay, in sequence order
    stopped: str                 # why the log ended early ("" = clean end)
    damaged: list[str]
    lost: list[str]
    last_seq: int                # highest sequence number in the ring or in place


@dataclass
class _Broken:
    offset: int
    why: str
    images: list[tuple[int, bytes]]
    bad_targets: list[int] | None  # None: the header cannot say which


def _jsb_block(blockno: int, gen: int, start_seq: int, start_off: int) -> bytearray:
    buf = mb.new_block(mb.KIND_JSUPER, blockno)
    _JSB.pack_into(buf, mb.HDR, gen, start_seq, start_off)
    return mb.seal(buf, gen)


def format_journal(f: HostFile) -> None:
    """Write fresh journal superblocks (start at sequence 1, offset 0)."""
    f.pwrite(JSB_A * mb.META, _jsb_block(JSB_A, 1, 1, 0))
    f.pwrite(JSB_B * mb.META, _jsb_block(JSB_B, 0, 1, 0))


def reset_journal(f: HostFile, geom: Geometry, start_seq: int) -> None:
    """Zero the ring and start it again at ``start_seq``, which must be above
    every generation in place (so later replays are not skipped)."""
    f.pwrite(JOURNAL_START * mb.META, bytes(geom.journal_blocks * mb.META))
    f.flush()
    f.pwrite(JSB_A * mb.META, _jsb_block(JSB_A, 1, start_seq, 0))
    f.pwrite(JSB_B * mb.META, _jsb_block(JSB_B, 0, start_seq, 0))
    f.flush()


def read_jsb(f: HostFile) -> tuple[list[str], tuple[int, int, int] | None]:
    """Problems found and the winning (generation, start_seq, start_off)."""
    problems: list[str] = []
    best = None
    for bno in (JSB_A, JSB_B):
        buf = f.pread(bno * mb.META, mb.META)
        try:
            mb.verify(buf, mb.KIND_JSUPER, bno)
        except mb.CorruptMetadata as e:
            problems.append(str(e))
            continue
        vals = _JSB.unpack_from(buf, mb.HDR)
        if best is None or vals[0] > best[0]:
            best = vals
    return problems, best


def _kind_at(geom: Geometry, bno: int) -> int:
    if bno < geom.desc_start:
        return mb.KIND_BITMAP
    if bno < geom.ptr_start:
        return mb.KIND_DESC
    return mb.KIND_PTR


def home_generation(f: HostFile, geom: Geometry) -> int:
    """The newest generation among sound bitmap and descriptor blocks in
    place. Every transaction changes at least one of them, so a transaction
    with a sequence number at or below this one reached its home."""
    lo, hi, desc = geom.bitmap_start(0), geom.ptr_start, geom.desc_start
    best = 0
    step = 256
    for first in range(lo, hi, step):
        n = min(step, hi - first)
        raw = f.pread(first * mb.META, n * mb.META)
        for i in range(n):
            buf = raw[i * mb.META:(i + 1) * mb.META]
            kind = mb.KIND_BITMAP if first + i < desc else mb.KIND_DESC
            if mb.is_sound(buf, kind, first + i):
                best = max(best, mb.header(buf)[6])
    return best


def max_generation(f: HostFile, geom: Geometry) -> int:
    """The newest generation of any sound metadata block (free pointer
    blocks included), reading only the allocated parts of the region."""
    lo, hi = geom.bitmap_start(0) * mb.META, geom.meta_end * mb.META
    best = 0
    for start, length in data_extents(f.fd, lo, hi):
        start -= start % mb.META
        end = start + length + mb.META
        for off in range(start, min(end, hi), 1 << 20):
            raw = f.pread(off, min(1 << 20, hi - off, end - off))
            for i in range(0, len(raw) - mb.META + 1, mb.META):
                bno = (off + i) // mb.META
                buf = raw[i:i + mb.META]
                if mb.is_sound(buf, _kind_at(geom, bno), bno):
                    best = max(best, mb.header(buf)[6])
    return best


class Journal:
    def __init__(self, f: HostFile, geom: Geometry) -> None:
        self.f = f
        self.geom = geom
        self.ring_len = geom.journal_blocks
        self.max_images = min(MAX_IMAGES, self.ring_len - 2)
        problems, best = read_jsb(f)
        if best is None:
            raise JournalError("both journal superblocks are damaged: "
                               + "; ".join(problems) + " (run check --repair)")
        self.jsb_problems = problems
        self.sb_gen, self.start_seq, self.start_off = best
        if not 0 <= self.start_off < self.ring_len:
            raise JournalError(f"journal start offset {self.start_off} outside the "
                               f"ring of {self.ring_len} blocks")
        self.head = self.start_off
        self.next_seq = self.start_seq
        self.stats = f.stats

    # -- reading -----------------------------------------------------------
    def _read_ring(self, off: int, n: int) -> bytes:
        return self.f.pread((JOURNAL_START + off) * mb.META, n * mb.META)

    def _parse(self, off: int, seq: int, n: int, hdr: bytes) -> JournalTxn | _Broken:
        """A whole transaction at ring offset ``off``, or what is left of it."""
        M = mb.META
        if not 1 <= n <= MAX_IMAGES or off + n + 2 > self.ring_len:
            return _Broken(off, f"transaction {seq}: bad image count {n}", [], None)
        body = self._read_ring(off + 1, n + 1)
        lo, hi = self.geom.bitmap_start(0), self.geom.meta_end
        images: list[tuple[int, bytes]] = []
        bad: list[int] = []
        for i in range(n):
            target, crc, _ = _JENTRY.unpack_from(hdr, mb.HDR + _JHDR.size + i * _JENTRY.size)
            img = body[i * M:(i + 1) * M]
            if not lo <= target < hi:
                return _Broken(off, f"transaction {seq}: image {i} targets block "
                               f"{target}, outside the metadata", [], None)
            if (mb.crc32c(img) != crc or mb.header(img)[5] != target
                    or mb.block_crc(img) != mb.header(img)[3]):
                bad.append(target)
            else:
                images.append((target, img))
        commit = body[n * M:(n + 1) * M]
        why = ""
        if not mb.is_sound(commit, mb.KIND_JCOMMIT, JOURNAL_START + off + n + 1):
            why = f"transaction {seq}: torn (commit block missing or bad)"
        else:
            cseq, cn, ccrc = _JCOMMIT.unpack_from(commit, mb.HDR)
            total = mb.crc32c(body[:n * M], mb.crc32c(hdr))
            if cseq != seq or cn != n or ccrc != total:
                why = f"transaction {seq}: torn (commit does not match body)"
        if bad:
            why = why or f"transaction {seq}: {len(bad)} images damaged"
        if why:
            return _Broken(off, why, images, bad)
        return JournalTxn(seq, off, images)

    def _headers(self) -> Iterator[tuple[int, bytes]]:
        """(ring offset, block) of every sound transaction header, reading
        the ring a window at a time and skipping its holes."""
        M = mb.META
        tag = struct.pack("<IH", mb.MAGIC, mb.KIND_JHEADER)
        base = JOURNAL_START * M
        end = base + self.ring_len * M
        for start, length in data_extents(self.f.fd, base, end):
            first, last = (start - base) // M, -(-(start + length - base) // M)
            for w in range(first, last, 256):
                n = min(256, last - w)
                raw = self._read_ring(w, n)
                for i in range(n):
                    if raw[i * M:i * M + 6] != tag:
                        continue  # not a header: no need to checksum it
                    hdr = raw[i * M:(i + 1) * M]
                    if mb.is_sound(hdr, mb.KIND_JHEADER, JOURNAL_START + w + i):
                        yield w + i, hdr

    def scan(self) -> ScanResult:
        """Decide what replay applies: see the module docstring."""
        valid: dict[int, JournalTxn] = {}
        broken: dict[int, _Broken] = {}
        for off, hdr in self._headers():
            if off >= self.ring_len - 1:
                continue
            seq, n, _ = _JHDR.unpack_from(hdr, mb.HDR)
            if seq < self.start_seq:
                continue  # checkpointed: at home already
            got = self._parse(off, seq, n, hdr)
            if isinstance(got, JournalTxn):
                valid.setdefault(seq, got)
            else:
                broken.setdefault(seq, got)
        home = home_generation(self.f, self.geom)
        seen = set(valid) | set(broken)
        top = max(seen | {home, self.start_seq - 1})
        newest = max(seen, default=0)  # a later record means this one was committed
        # with a journal superblock lost, the one left may be older: the
        # transactions it still points at may have been overwritten by a
        # later lap after being checkpointed, so gaps below the oldest one
        # found are not damage
        lowest = self.start_seq if not self.jsb_problems else min(valid, default=top + 1)
        txns: list[JournalTxn] = []
        damaged: list[str] = []
        lost: list[str] = []
        stopped = ""
        for seq in range(lowest, top + 1):
            if seq in valid:
                txns.append(valid[seq])
                continue
            committed = seq <= home or seq < newest
            b = broken.get(seq)
            if not committed:
                stopped = b.why if b else ""
                break  # a crash mid-commit: the end of the log
            if b is None:
                lost.append(f"transaction {seq} was committed but its journal record "
                            f"is unreadable")
                continue
            txns.append(JournalTxn(seq, b.offset, b.images))
            if b.bad_targets is None:
                lost.append(f"{b.why}; it was committed and cannot be replayed")
                continue
            missing = [t for t in b.bad_targets if not self._home_at_least(t, seq)]
            if missing:
                lost.append(f"{b.why}; committed changes to metadata blocks "
                            f"{', '.join(map(str, missing))} cannot be replayed")
            else:
                damaged.append(f"{b.why}; it was committed and is recovered from "
                               f"its intact images")
        return ScanResult(txns, stopped, damaged, lost, top)

    def _home_at_least(self, target: int, seq: int) -> bool:
        buf = self.f.pread(target * mb.META, mb.META)
        return (mb.is_sound(buf, _kind_at(self.geom, target), target)
                and mb.header(buf)[6] >= seq)

    def replay(self, apply: Callable[[int, bytes], None] | None = None, *,
               scan: ScanResult | None = None) -> ReplayReport:
        """Redo committed transactions in sequence order, writing an image
        only over an older or damaged block, then checkpoint."""
        res = scan if scan is not None else self.scan()
        rep = ReplayReport(stopped=res.stopped, first_seq=self.start_seq,
                           damaged=list(res.damaged), lost=list(res.lost))
        for t in res.txns:
            for target, img in t.images:
                if self._home_at_least(target, t.seq):
                    rep.skipped += 1
                    continue
                if apply is not None:
                    apply(target, img)
                else:
                    self.f.pwrite(target * mb.META, img)
                rep.images += 1
            rep.replayed += 1
        self.next_seq = res.last_seq + 1
        rep.next_seq = self.next_seq
        if res.txns or self.next_seq != self.start_seq or self.jsb_problems:
            self.checkpoint(wrap=True)
        else:
            self.head = self.start_off
        return rep

    # -- writing -----------------------------------------------------------
    def commit(self, images: Iterable[tuple[int, bytearray | bytes]]) -> int:
        """Write one physical transaction with one write and one flush;
        return its sequence number. Images must already be sealed."""
        imgs = list(images)
        n = len(imgs)
        if not 1 <= n <= self.max_images:
            raise JournalError(f"a transaction of {n} blocks does not fit "
                               f"(1..{self.max_images})")
        if self.head + n + 2 > self.ring_len:
            self.checkpoint(wrap=True)
        seq = self.next_seq
        off = self.head
        buf = bytearray((n + 2) * mb.META)
        hdr = mb.new_block(mb.KIND_JHEADER, JOURNAL_START + off)
        _JHDR.pack_into(hdr, mb.HDR, seq, n, 0)
        for i, (target, img) in enumerate(imgs):
            _JENTRY.pack_into(hdr, mb.HDR + _JHDR.size + i * _JENTRY.size,
                              target, mb.crc32c(img), 0)
            buf[(i + 1) * mb.META:(i + 2) * mb.META] = img
        mb.seal(hdr, seq)
        buf[:mb.META] = hdr
        commit = mb.new_block(mb.KIND_JCOMMIT, JOURNAL_START + off + n + 1)
        total = mb.crc32c(memoryview(buf)[mb.META:(n + 1) * mb.META], mb.crc32c(hdr))
        _JCOMMIT.pack_into(commit, mb.HDR, seq, n, total)
        buf[(n + 1) * mb.META:] = mb.seal(commit, seq)
        self.f.pwrite((JOURNAL_START + off) * mb.META, buf)
        self.stats.journal_writes += 1
        self.stats.journal_bytes += len(buf)
        self.f.flush()
        self.stats.transactions += 1
        self.head = off + n + 2
        self.next_seq = seq + 1
        return seq

    def checkpoint(self, wrap: bool = False, *, final: bool = False) -> None:
        """Make in-place metadata durable, then move the replay start to the
        head (or to the ring's start when wrapping), freeing the ring.

        ``final`` (closing): nothing to do if nothing was committed since the
        last checkpoint, and the new start need not be flushed: if it is
        lost, the next open replays transactions whose metadata is home
        already, which replay skips by generation."""
        if final and self.next_seq == self.start_seq and self.head == self.start_off:
            return
        self.f.flush()
        # a transaction that ended exactly at the ring's end leaves head there
        start = 0 if wrap or self.head + 2 > self.ring_len else self.head
        gen = self.sb_gen + 1
        bno = JSB_A if gen % 2 else JSB_B
        self.f.pwrite(bno * mb.META, _jsb_block(bno, gen, self.next_seq, start))
        if not final:
            self.f.flush()
        self.sb_gen, self.start_seq, self.start_off = gen, self.next_seq, start
        self.head = start
        self.stats.checkpoints += 1
