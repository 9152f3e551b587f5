"""A block-file volume: one host file holding several thin virtual disks.

Layout (4 KiB metadata blocks, then sub-blocks, then file blocks)::

    0 superblock | 1 backup superblock | 2,3 journal superblocks A/B |
    journal ring | bitmaps (file blocks, sub-blocks, pointer blocks) |
    file descriptors | pointer blocks | sub-blocks | file blocks

The host file is sparse: nothing past the formatted metadata is written
until a disk writes there, so unwritten blocks read as zeros and use no
space. Every metadata change goes through the journal (see ``journal``);
the scatter-gather write path is in ``writepath``.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

from hvkit.errors import ConfigError
from hvkit.storage import blockmap as bm
from hvkit.storage import metablock as mb
from hvkit.storage.backend import StorageError
from hvkit.storage.bitmap import Bitmap, VolumeFull
from hvkit.storage.hostfile import HostFile, IOStats
from hvkit.storage.journal import Journal, ReplayReport, format_journal
from hvkit.storage.metacache import MetaCache
from hvkit.storage.superblock import (RES_BLOCK, RES_PTR, RES_SUB, SB_BACKUP,
                                      SB_PRIMARY, Geometry)
from hvkit.storage.writepath import LOGICAL_TXN_MAX_BLOCKS, write_sg

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview
SGElement = tuple[Buffer, int]

#: worst-case metadata blocks one logical transaction dirties: descriptor,
#: three new pointer blocks and their parents, three bitmap blocks


@dataclass
class FileInfo:
    """A virtual disk in the volume."""

    index: int
    name: str
    size: int
    created_ns: int
    #: an import into it did not finish; ``check --repair`` rolls it back
    incomplete: bool = False


@dataclass(frozen=True)
class Location:
    """Where one file block lives in the host file."""

    kind: int        # bm.PK_BLOCK or bm.PK_SUB
    index: int
    offset: int      # byte offset in the host file
    length: int      # bytes of the unit (block or sub-block size)


class Volume:
    """Open with ``Volume.open``; make with ``Volume.create``."""

    def __init__(self, f: HostFile, geom: Geometry, replay: ReplayReport) -> None:
        self.f = f
        self.geom = geom
        self.replay_report = replay
        self.stats: IOStats = f.stats
        self.cache = MetaCache(f)
        self.journal = Journal.__new__(Journal)
        self.lock = threading.RLock()
        self.bitmaps = {r: Bitmap(self.cache, geom, r) for r in (RES_BLOCK, RES_SUB, RES_PTR)}
        self.broken: str = ""
        self._files: dict[str, int] = {}

    # -- creation and opening ---------------------------------------------
    @classmethod
    def create(cls, path: str, geom: Geometry, *, host: HostFile | None = None) -> "Volume":
        """Format a new volume file (refuses to overwrite an existing one)."""
        f = host or HostFile(path, create=True)
        try:
            f.truncate(geom.file_size)
            format_journal(f)
            for res in (RES_BLOCK, RES_SUB, RES_PTR):
                start = geom.bitmap_start(res)
                blob = bytearray()
                for b in range(geom.bitmap_blocks(res)):
                    blob += mb.seal(mb.new_block(mb.KIND_BITMAP, start + b), 0)
                f.pwrite(start * mb.META, blob)
            blob = bytearray()
            for i in range(geom.max_files):
                buf = mb.new_block(mb.KIND_DESC, geom.desc_start + i)
                bm.write_desc(buf, in_use=False, name="", size=0, created_ns=0)
                blob += mb.seal(buf, 0)
            f.pwrite(geom.desc_start * mb.META, blob)
            f.flush()
            # superblocks last: a half-formatted file is never taken for a volume
            f.pwrite(SB_BACKUP * mb.META, geom.encode(SB_BACKUP))
            f.pwrite(SB_PRIMARY * mb.META, geom.encode(SB_PRIMARY))
            f.flush()
        except BaseException:
            if host is None:
                f.close()
                os.unlink(path)
            raise
        return cls._attach(f)

    @classmethod
    def open(cls, path: str, *, host: HostFile | None = None) -> "Volume":
        """Open a volume, replaying committed journal transactions."""
        f = host or HostFile(path)
        try:
            return cls._attach(f)
        except BaseException:
            if host is None:
                f.close()
            raise

    @staticmethod
    def read_geometry(f: HostFile) -> tuple[Geometry, list[str]]:
        """The geometry from the primary superblock, else the backup."""
        problems = []
        for bno in (SB_PRIMARY, SB_BACKUP):
            try:
                return Geometry.decode(f.pread(bno * mb.META, mb.META), bno), problems
            except mb.CorruptMetadata as e:
                problems.append(str(e))
        raise StorageError(f"{f.path!r} is not a usable block-file volume: "
                           + "; ".join(problems))

    @classmethod
    def _attach(cls, f: HostFile) -> "Volume":
        geom, _ = cls.read_geometry(f)
        if f.size() < geom.file_size:
            raise StorageError(f"volume file {f.path!r} is truncated: {f.size()} bytes, "
                               f"the volume needs {geom.file_size} (run hvkit disk "
                               f"check to see what was lost)")
        journal = Journal(f, geom)
        scan = journal.scan()
        if scan.lost:
            raise StorageError(f"volume {f.path!r}: the journal lost committed changes ("
                               + "; ".join(scan.lost[:3]) + "): run hvkit disk check "
                               "--repair to see what is left")
        if f.read_only:
            if scan.txns:
                raise StorageError(f"volume {f.path!r} has {len(scan.txns)} journal "
                                   f"transactions to replay: open it read-write first")
            report = ReplayReport(first_seq=journal.start_seq, next_seq=journal.next_seq)
        else:
            report = journal.replay(scan=scan)
            for why in report.damaged:
                log.warning("%s: %s", f.path, why)
        vol = cls(f, geom, report)
        vol.journal = journal
        vol._load_files()
        return vol

    def _load_files(self) -> None:
        self._files.clear()
        for i in range(self.geom.max_files):
            info = bm.read_desc(self.cache.get(self.geom.desc_start + i, mb.KIND_DESC), i)
            if info.in_use:
                self._files[info.name] = i

    # -- files -------------------------------------------------------------
    def files(self) -> list[FileInfo]:
        with self.lock:
            return [self.file_info(i) for i in sorted(self._files.values())]

    def file_info(self, index: int) -> FileInfo:
        d = bm.read_desc(self._desc(index), index)
        if not d.in_use:
            raise StorageError(f"no file with descriptor {index}")
        return FileInfo(index, d.name, d.size, d.created_ns, d.incomplete)

    def lookup(self, name: str) -> int:
        try:
            return self._files[name]
        except KeyError:
            known = ", ".join(sorted(self._files)) or "none"
            raise StorageError(f"no virtual disk named {name!r} in {self.f.path!r} "
                               f"(disks: {known})") from None

    def create_file(self, name: str, size: int, *, incomplete: bool = False) -> int:
        """Add a thin virtual disk of ``size`` bytes; return its index. An
        ``incomplete`` disk (being imported) stays marked until
        ``mark_complete``, so a stopped import is never taken for a disk;
        its creation is committed with its first data (a crash before
        leaves nothing to clean up)."""
        if not name or "/" in name or len(name.encode()) > bm.NAME_MAX:
            raise ConfigError(f"bad disk name {name!r}: 1..{bm.NAME_MAX} bytes, no '/'")
        limit = bm.MAX_FILE_BLOCKS * self.geom.block_size
        if not 0 < size <= limit:
            raise ConfigError(f"disk size {size} must be 1..{limit} bytes")
        with self.lock:
            self._check_usable()
            if name in self._files:
                raise ConfigError(f"a disk named {name!r} already exists")
            for i in range(self.geom.max_files):
                buf = self._desc(i)
                if not bm.read_desc(buf, i).in_use:
                    break
            else:
                raise VolumeFull(f"volume full: all {self.geom.max_files} file "
                                 f"descriptors are in use")
            buf[mb.HDR:] = bytes(mb.PAYLOAD)
            bm.write_desc(buf, in_use=True, name=name, size=size,
                          created_ns=time.time_ns(), incomplete=incomplete)
            self.cache.touch(self.geom.desc_start + i)
            self.stats.logical_transactions += 1
            if not incomplete:
                self.commit_dirty(data_written=False)
            self._files[name] = i
            return i

    def mark_complete(self, index: int) -> None:
        """Clear the incomplete mark (one transaction, after the data)."""
        with self.lock:
            self._check_usable()
            info = self.file_info(index)
            buf = self._desc(index)
            bm.write_desc(buf, in_use=True, name=info.name, size=info.size,
                          created_ns=info.created_ns, incomplete=False)
            self.cache.touch(self.geom.desc_start + index)
            self.stats.logical_transactions += 1
            self.commit_dirty(data_written=True)

    def delete_file(self, index: int) -> None:
        """Remove a disk and free everything it holds (one transaction)."""
        with self.lock:
            self._check_usable()
            info = self.file_info(index)
            freed: list[Location] = []
            for kind, unit, _ in self._walk(index):
                self.bitmaps[bm.resource_of(kind)].free(unit)
                if kind != bm.PK_PTR:
                    freed.append(self._location(kind, unit))
            buf = self._desc(index)
            buf[mb.HDR:] = bytes(mb.PAYLOAD)
            bm.write_desc(buf, in_use=False, name="", size=0, created_ns=0)
            self.cache.touch(self.geom.desc_start + index)
            self.stats.logical_transactions += 1
            self.commit_dirty(data_written=False)
            del self._files[info.name]
            for loc in freed:
                self.f.punch(loc.offset, loc.length)

    # -- block map ----------------------------------------------------------
    def _desc(self, index: int) -> bytearray:
        if not 0 <= index < self.geom.max_files:
            raise StorageError(f"file descriptor {index} out of range "
                               f"(0..{self.geom.max_files - 1})")
        return self.cache.get(self.geom.desc_start + index, mb.KIND_DESC)

    def _location(self, kind: int, index: int) -> Location:
        if kind == bm.PK_SUB:
            return Location(kind, index, self.geom.sub_block_offset(index),
                            self.geom.sub_block_size)
        return Location(kind, index, self.geom.block_offset(index), self.geom.block_size)

    def resolve(self, fidx: int, fbi: int) -> Location | None:
        """Where file block ``fbi`` lives, or None for a hole."""
        slot, idxs = bm.path(fbi)
        buf = self._desc(fidx)
        ptr = bm.get_u64(buf, bm.slot_offset(slot))
        for ix in idxs:
            if ptr == 0:
                return None
            _, pb = bm.decode_ptr(ptr, self.geom, where=f" in file {fidx}")
            buf = self.cache.get(self.geom.ptr_start + pb, mb.KIND_PTR)
            ptr = bm.get_u64(buf, bm.entry_offset(ix))
        if ptr == 0:
            return None
        kind, unit = bm.decode_ptr(ptr, self.geom, where=f" in file {fidx}")
        return self._location(kind, unit)

    def allocate(self, fidx: int, fbi: int, size: int) -> Location:
        """One logical transaction: give hole ``fbi`` a unit (file block or
        sub-block), adding pointer blocks on the way; edits the cache only."""
        want = bm.leaf_kind(self.geom, size, fbi)
        res = bm.resource_of(want)
        slot, idxs = bm.path(fbi)
        # refuse before touching anything, so a full volume leaves no half-made map
        self._need(res, 1)
        self._need(RES_PTR, len(idxs))
        bno = self.geom.desc_start + fidx
        buf = self._desc(fidx)
        off = bm.slot_offset(slot)
        for ix in idxs:
            ptr = bm.get_u64(buf, off)
            if ptr == 0:
                pb = self.bitmaps[RES_PTR].alloc()
                bm.set_u64(buf, off, bm.make_ptr(bm.PK_PTR, pb))
                self.cache.touch(bno)
                bno = self.geom.ptr_start + pb
                buf = self.cache.create(bno, mb.KIND_PTR)
            else:
                _, pb = bm.decode_ptr(ptr, self.geom, where=f" in file {fidx}")
                bno = self.geom.ptr_start + pb
                buf = self.cache.get(bno, mb.KIND_PTR)
            off = bm.entry_offset(ix)
        if bm.get_u64(buf, off):
            raise StorageError(f"file {fidx} block {fbi} is already mapped")
        unit = self.bitmaps[res].alloc()
        bm.set_u64(buf, off, bm.make_ptr(want, unit))
        self.cache.touch(bno)
        self.stats.logical_transactions += 1
        return self._location(want, unit)

    def unmap(self, fidx: int, fbi: int) -> Location | None:
        """One logical transaction: turn file block ``fbi`` back into a hole."""
        slot, idxs = bm.path(fbi)
        bno = self.geom.desc_start + fidx
        buf = self._desc(fidx)
        off = bm.slot_offset(slot)
        for ix in idxs:
            ptr = bm.get_u64(buf, off)
            if ptr == 0:
                return None
            _, pb = bm.decode_ptr(ptr, self.geom, where=f" in file {fidx}")
            bno = self.geom.ptr_start + pb
            buf = self.cache.get(bno, mb.KIND_PTR)
            off = bm.entry_offset(ix)
        ptr = bm.get_u64(buf, off)
        if ptr == 0:
            return None
        kind, unit = bm.decode_ptr(ptr, self.geom, where=f" in file {fidx}")
        bm.set_u64(buf, off, 0)
        self.cache.touch(bno)
        self.bitmaps[bm.resource_of(kind)].free(unit)
        self.stats.logical_transactions += 1
        return self._location(kind, unit)

    def _need(self, res: int, n: int) -> None:
        if n and self.bitmaps[res].used_count() + n > self.bitmaps[res].count:
            raise VolumeFull(f"volume full: no free {self.bitmaps[res].name} left "
                             f"({self.bitmaps[res].count} in all)")

    def _walk(self, fidx: int) -> Iterator[tuple[int, int, int]]:
        """Every (kind, unit, depth) a file's block map references."""
        buf = self._desc(fidx)

        def sub(ptr: int, depth: int) -> Iterator[tuple[int, int, int]]:
            kind, unit = bm.decode_ptr(ptr, self.geom, where=f" in file {fidx}")
            yield kind, unit, depth
            if depth:
                pbuf = self.cache.get(self.geom.ptr_start + unit, mb.KIND_PTR)
                for i in range(bm.P):
                    p = bm.get_u64(pbuf, bm.entry_offset(i))
                    if p:
                        yield from sub(p, depth - 1)

        for slot in range(bm.N_SLOTS):
            p = bm.get_u64(buf, bm.slot_offset(slot))
            if p:
                yield from sub(p, max(0, slot - bm.N_DIRECT + 1))

    # -- commit -------------------------------------------------------------
    def commit_dirty(self, *, data_written: bool) -> int:
        """Commit every dirty metadata block as one physical transaction:
        flush new data first (ordered mode), journal with one write and one
        flush, then write the blocks back in place."""
        dirty = self.cache.take_dirty()
        if not dirty:
            if data_written:
                self.f.flush()
            return 0
        try:
            if data_written:
                self.f.flush()  # data before the commit that makes it reachable
            seq = self.journal.next_seq
            images = [(b, mb.seal(self.cache.blocks[b], seq)) for b in dirty]
            self.journal.commit(images)
            for b, img in images:
                self.f.pwrite(b * mb.META, img)
                self.stats.meta_writes += 1
        except BaseException as e:
            self._fail(f"commit failed: {e}")
            raise
        return seq

    def _fail(self, why: str) -> None:
        self.cache.drop()
        for b in self.bitmaps.values():
            b.forget()
        self.broken = why

    def _check_usable(self) -> None:
        if self.broken:
            raise StorageError(f"volume {self.f.path!r} needs reopening: {self.broken}")
        if self.f.read_only:
            raise StorageError(f"volume {self.f.path!r} is open read-only")

    # -- data ---------------------------------------------------------------
    def _check_range(self, fidx: int, offset: int, length: int, what: str) -> int:
        size = self.file_info(fidx).size
        if (isinstance(offset, bool) or isinstance(length, bool)
                or not isinstance(offset, int) or not isinstance(length, int)):
            raise StorageError(f"{what}: offset {offset!r} and length {length!r} must be "
                               f"integers")
        if offset < 0 or length < 0 or offset + length > size:
            raise StorageError(f"{what} of {length} bytes at offset {offset} is outside "
                               f"the disk ({size} bytes)")
        return size

    def read(self, fidx: int, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from the disk; holes read as zeros."""
        buf = memoryview(buf).cast("B")
        with self.lock:
            if self.broken:
                self._check_usable()
            self._check_range(fidx, offset, len(buf), "read")
            bs = self.geom.block_size
            pos = 0
            while pos < len(buf):
                fbi, inblk = divmod(offset + pos, bs)
                n = min(bs - inblk, len(buf) - pos)
                loc = self.resolve(fidx, fbi)
                if loc is None:
                    buf[pos:pos + n] = bytes(n)
                else:
                    self.f.preadinto(loc.offset + inblk, buf[pos:pos + n])
                pos += n

    def read_bytes(self, fidx: int, offset: int, length: int) -> bytes:
        out = bytearray(length)
        self.read(fidx, offset, memoryview(out))
        return bytes(out)

    def write_sg(self, fidx: int, sg: Sequence[SGElement], *, durable: bool = True):
        """Write a scatter-gather array as one batched journal transaction
        (see ``writepath.write_sg``); durable when it returns unless
        ``durable=False`` (then the next commit makes it so)."""
        return write_sg(self, fidx, sg, durable=durable)

    def write(self, fidx: int, offset: int, data: Buffer):
        return self.write_sg(fidx, [(data, offset)])

    def discard(self, fidx: int, offset: int, length: int, *, zero: bool = True) -> int:
        """Unmap whole blocks inside the range (one batched transaction) and,
        when ``zero``, write zeros over the partial blocks at its ends.
        Returns the number of blocks freed."""
        with self.lock:
            self._check_usable()
            size = self._check_range(fidx, offset, length, "discard")
            bs = self.geom.block_size
            first = -(-offset // bs)
            end = offset + length
            last = end // bs if end < size else bm.file_blocks(self.geom, size)
            freed: list[Location] = []
            zero_ranges = []
            if first * bs > offset:
                zero_ranges.append((offset, min(first * bs, end)))
            if last >= first and last * bs < end:
                zero_ranges.append((last * bs, end))
            if last < first:
                zero_ranges = [(offset, end)]
            try:
                for fbi in range(first, max(first, last)):
                    if len(self.cache.dirty) + LOGICAL_TXN_MAX_BLOCKS > self.journal.max_images:
                        self.commit_dirty(data_written=False)
                    loc = self.unmap(fidx, fbi)
                    if loc is not None:
                        freed.append(loc)
            finally:
                self.commit_dirty(data_written=False)
            for loc in freed:
                self.f.punch(loc.offset, loc.length)
            if zero:
                for lo, hi in zero_ranges:
                    if hi > lo and self._mapped(fidx, lo, hi):
                        self.write_sg(fidx, [(bytes(hi - lo), lo)])
            return len(freed)

    def _mapped(self, fidx: int, lo: int, hi: int) -> bool:
        bs = self.geom.block_size
        return any(self.resolve(fidx, b) is not None for b in range(lo // bs, (hi - 1) // bs + 1))

    def write_zeroes(self, fidx: int, offset: int, length: int) -> None:
        self.discard(fidx, offset, length, zero=True)

    def flush(self) -> None:
        with self.lock:
            self.f.flush()

    # -- space --------------------------------------------------------------
    def usage(self) -> dict[str, int]:
        with self.lock:
            return {
                "blocks_used": self.bitmaps[RES_BLOCK].used(),
                "blocks_total": self.geom.n_blocks,
                "sub_blocks_used": self.bitmaps[RES_SUB].used(),
                "sub_blocks_total": self.geom.n_sub,
                "pointer_blocks_used": self.bitmaps[RES_PTR].used(),
                "pointer_blocks_total": self.geom.n_ptr,
                "host_bytes_allocated": self.f.allocated_bytes(),
            }

    def close(self) -> None:
        """Checkpoint (so the next open has nothing to replay) and close."""
        with self.lock:
            if self.f.fd < 0:
                return
            try:
                if not self.broken and not self.f.read_only:
                    if self.cache.dirty:  # writes made with durable=False
                        self.commit_dirty(data_written=True)
                    self.journal.checkpoint(final=True)
            finally:
                self.f.close()

    def __enter__(self) -> "Volume":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
