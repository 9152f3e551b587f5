"""The redo journal: a ring of physical transactions of whole metadata
block images.

One physical transaction is a header block (sequence number, the target
and crc32c of every image), the images, and a commit block whose crc32c
covers all of them. It goes to the ring in one write followed by one
flush; on open, transactions are replayed in sequence order and the first
one that is torn (any crc wrong, short, wrong sequence) ends the replay,
so a crash mid-commit leaves the volume as it was before it.

Two journal superblocks (A/B, highest valid generation wins) record where
replay starts; a checkpoint flushes the in-place metadata and moves that
start, freeing the ring.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Iterable

from hvkit.storage import metablock as mb
from hvkit.storage.backend import StorageError
from hvkit.storage.hostfile import HostFile
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
    stopped: str = ""  # why replay ended before the ring's end ("" = clean end)
    first_seq: int = 0
    next_seq: int = 0


@dataclass
class JournalTxn:
    """A valid transaction found in the ring."""

    seq: int
    offset: int
    images: list[tuple[int, bytes]]


def _jsb_block(blockno: int, gen: int, start_seq: int, start_off: int) -> bytearray:
    buf = mb.new_block(mb.KIND_JSUPER, blockno)
    _JSB.pack_into(buf, mb.HDR, gen, start_seq, start_off)
    return mb.seal(buf, gen)


def format_journal(f: HostFile) -> None:
    """Write fresh journal superblocks (start at sequence 1, offset 0)."""
    f.pwrite(JSB_A * mb.META, _jsb_block(JSB_A, 1, 1, 0))
    f.pwrite(JSB_B * mb.META, _jsb_block(JSB_B, 0, 1, 0))


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

    def scan(self) -> tuple[list[JournalTxn], str, int]:
        """Valid transactions from the start, the reason the scan stopped,
        and the ring offset after the last valid one."""
        txns: list[JournalTxn] = []
        off, seq = self.start_off, self.start_seq
        lo, hi = self.geom.bitmap_start(0), self.geom.meta_end
        while True:
            if off + 2 > self.ring_len:
                return txns, "", off
            hdr = self._read_ring(off, 1)
            if not mb.is_sound(hdr, mb.KIND_JHEADER, JOURNAL_START + off):
                return txns, self._why(hdr, off, seq), off
            hseq, n, _ = _JHDR.unpack_from(hdr, mb.HDR)
            if hseq != seq:
                return txns, "", off  # an older transaction: end of the log
            if not 1 <= n <= MAX_IMAGES or off + n + 2 > self.ring_len:
                return txns, f"transaction {seq}: bad image count {n}", off
            body = self._read_ring(off + 1, n + 1)
            commit = body[n * mb.META:]
            if not mb.is_sound(commit, mb.KIND_JCOMMIT, JOURNAL_START + off + n + 1):
                return txns, f"transaction {seq}: torn (commit block missing or bad)", off
            cseq, cn, ccrc = _JCOMMIT.unpack_from(commit, mb.HDR)
            total = mb.crc32c(body[:n * mb.META], mb.crc32c(hdr))
            if cseq != seq or cn != n or ccrc != total:
                return txns, f"transaction {seq}: torn (commit does not match body)", off
            images = []
            for i in range(n):
                target, crc, _ = _JENTRY.unpack_from(hdr, mb.HDR + _JHDR.size + i * _JENTRY.size)
                img = body[i * mb.META:(i + 1) * mb.META]
                if mb.crc32c(img) != crc or not lo <= target < hi:
                    return txns, f"transaction {seq}: image {i} bad", off
                if mb.header(img)[5] != target or mb.block_crc(img) != mb.header(img)[3]:
                    return txns, f"transaction {seq}: image {i} not sealed for {target}", off
                images.append((target, img))
            txns.append(JournalTxn(seq, off, images))
            off += n + 2
            seq += 1

    @staticmethod
    def _why(hdr: bytes, off: int, seq: int) -> str:
        if hdr.count(0) == len(hdr):
            return ""
        magic, kind = struct.unpack_from("<IH", hdr, 0)
        if magic == mb.MAGIC and kind == mb.KIND_JHEADER:
            return f"transaction {seq} at ring offset {off}: torn header"
        return ""  # stale contents past the end of the log

    def replay(self, apply: Callable[[int, bytes], None] | None = None) -> ReplayReport:
        """Redo every committed transaction in place, then checkpoint."""
        txns, why, end = self.scan()
        rep = ReplayReport(stopped=why, first_seq=self.start_seq)
        for t in txns:
            for target, img in t.images:
                if apply is not None:
                    apply(target, img)
                else:
                    self.f.pwrite(target * mb.META, img)
                rep.images += 1
            rep.replayed += 1
        self.head = end
        self.next_seq = self.start_seq + len(txns)
        rep.next_seq = self.next_seq
        if txns:
            self.checkpoint()
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

    def checkpoint(self, wrap: bool = False) -> None:
        """Make in-place metadata durable, then move the replay start to the
        head (or to the ring's start when wrapping), freeing the ring."""
        self.f.flush()
        # a transaction that ended exactly at the ring's end leaves head there
        start = 0 if wrap or self.head + 2 > self.ring_len else self.head
        gen = self.sb_gen + 1
        bno = JSB_A if gen % 2 else JSB_B
        self.f.pwrite(bno * mb.META, _jsb_block(bno, gen, self.next_seq, start))
        self.f.flush()
        self.sb_gen, self.start_seq, self.start_off = gen, self.next_seq, start
        self.head = start
        self.stats.checkpoints += 1
