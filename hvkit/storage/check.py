"""Consistency check and repair of a block-file volume (``hvkit disk check``).

The checker reads metadata straight from the file, not through a
``Volume``, so it can look at volumes that would not open. It replays the
journal first (as any open does), then walks every block map, counts who
references each file block, sub-block and pointer block, and compares that
with the bitmaps. Repair rewrites what can be derived again: bitmaps from
the references, the superblock from its backup, the journal superblocks;
it clears pointers that are out of range or lead to damaged pointer
blocks, gives the second owner of a doubly allocated data block its own
copy, and removes descriptors that fail their checksum.
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from typing import Callable

from hvkit.storage import blockmap as bm
from hvkit.storage import metablock as mb
from hvkit.storage.backend import StorageError
from hvkit.storage.hostfile import HostFile, data_extents
from hvkit.storage.journal import (Journal, JournalError, _jsb_block, max_generation,
                                   read_jsb, reset_journal)
from hvkit.storage.superblock import (BITS_PER_BITMAP_BLOCK, JOURNAL_START, JSB_A, JSB_B,
                                      RES_BLOCK, RES_PTR, RES_SUB, RESOURCE_NAMES,
                                      SB_BACKUP, SB_PRIMARY, Geometry)

EXIT_CLEAN = 0
EXIT_CORRECTED = 1
EXIT_UNCORRECTED = 4


@dataclass
class Problem:
    code: str      # bad-checksum, double-allocation, leaked-block, ...
    message: str
    fixable: bool = True

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass
class CheckReport:
    path: str
    problems: list[Problem] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    replayed: int = 0
    files: int = 0
    used: dict[str, int] = field(default_factory=dict)
    fatal: bool = False

    @property
    def clean(self) -> bool:
        return not self.problems

    def exit_code(self, repaired: bool) -> int:
        if not self.problems:
            return EXIT_CLEAN
        if repaired and not self.fatal and all(p.fixable for p in self.problems):
            return EXIT_CORRECTED
        return EXIT_UNCORRECTED


@dataclass
class _Ref:
    owner: str
    container: int     # metadata block holding the pointer
    offset: int        # byte offset of the pointer in it
    fidx: int


def _bits_of(units, count: int) -> int:
    """The set of ``units`` as an int bitmap, built in linear time."""
    raw = bytearray((count + 7) // 8)
    for u in units:
        raw[u >> 3] |= 1 << (u & 7)
    return int.from_bytes(raw, "little")


@dataclass
class _File:
    index: int
    name: str
    size: int
    nblocks: int
    rollback: bool = False


@dataclass
class _BadPtr:
    ctx: _File
    ptr: int
    container: int
    off: int
    depth: int
    first: int
    span: int
    where: str
    fault: str


class _Checker:
    def __init__(self, f: HostFile, repair: bool, progress: Callable[[str], None]) -> None:
        self.f = f
        self.repair = repair
        self.progress = progress
        self.rep = CheckReport(f.path)
        self.blocks: dict[int, bytearray] = {}
        self.dirty: set[int] = set()
        self.raw_bits: dict[int, int] = {}

    def problem(self, code: str, msg: str, fixable: bool = True) -> None:
        self.rep.problems.append(Problem(code, msg, fixable))

    def read(self, bno: int) -> bytearray:
        buf = self.blocks.get(bno)
        if buf is None:
            buf = self.blocks[bno] = bytearray(self.f.pread(bno * mb.META, mb.META))
        return buf

    # -- the passes --------------------------------------------------------
    def run(self) -> CheckReport:
        geom = self.superblocks()
        if geom is None:
            return self.rep
        self.geom = geom
        if self.f.size() < geom.sub_offset:
            self.problem("truncated", f"file is {self.f.size()} bytes, metadata needs "
                         f"{geom.sub_offset}", fixable=False)
            self.rep.fatal = True
            return self.rep
        self.journal()
        self.progress("checking bitmaps")
        bits = {r: self.bitmap(r) for r in (RES_BLOCK, RES_SUB, RES_PTR)}
        self.progress("checking file descriptors and block maps")
        self.refs: dict[int, dict[int, _Ref]] = {r: {} for r in bits}
        self.dups: list[tuple[int, int, _Ref]] = []
        self.bad: list[_BadPtr] = []
        self.names: dict[str, int] = {}
        self.used_desc: set[int] = set()
        self.rollback: set[tuple[int, int]] = set()
        self.rollback_desc: list[int] = []
        for i in range(geom.max_files):
            self.descriptor(i)
        refs = self.refs
        self.mend_pointers()
        self.progress("comparing references with bitmaps")
        for r in (RES_BLOCK, RES_SUB, RES_PTR):
            self.compare(r, bits[r], refs[r])
        self.truncation(refs)
        if self.repair:
            self.fix_duplicates(self.dups, refs)
            self.roll_back()
            self.lost_and_found()
            self.rebuild_bitmaps(refs)
            self.write_back()
        self.rep.used = {RESOURCE_NAMES[r]: len(refs[r]) for r in refs}
        return self.rep

    def superblocks(self) -> Geometry | None:
        geoms: dict[int, Geometry] = {}
        for bno in (SB_PRIMARY, SB_BACKUP):
            try:
                geoms[bno] = Geometry.decode(self.f.pread(bno * mb.META, mb.META), bno)
            except mb.CorruptMetadata as e:
                self.problem("bad-checksum", str(e), fixable=True)
        if not geoms:
            self.rep.fatal = True
            self.rep.problems[-1].fixable = False
            self.rep.problems[0].fixable = False
            return None
        geom = geoms.get(SB_PRIMARY) or geoms[SB_BACKUP]
        if len(geoms) == 2 and geoms[SB_PRIMARY] != geoms[SB_BACKUP]:
            self.problem("superblock-mismatch", "primary and backup superblocks differ "
                         "(the primary is kept)")
        if self.repair and (len(geoms) < 2 or geoms[SB_PRIMARY] != geoms[SB_BACKUP]):
            for bno in (SB_PRIMARY, SB_BACKUP):
                self.f.pwrite(bno * mb.META, geom.encode(bno))
            self.rep.repaired.append("rewrote both superblocks")
        return geom

    def journal(self) -> None:
        problems, best = read_jsb(self.f)
        for p in problems:
            self.problem("bad-checksum", p)
        if best is not None and not 0 <= best[2] < self.geom.journal_blocks:
            self.problem("pointer-out-of-range", f"journal start {best[2]} outside the ring")
            best = None
        if best is None:
            if self.repair:
                start = max_generation(self.f, self.geom) + 1
                reset_journal(self.f, self.geom, start)
                self.rep.repaired.append(f"reset the journal at sequence {start} "
                                         f"(nothing could be replayed)")
            return
        try:
            j = Journal(self.f, self.geom)
            scan = j.scan()
        except JournalError as e:
            self.problem("journal", str(e), fixable=False)
            return
        for why in scan.damaged:
            self.problem("journal-damaged", why)
        for why in scan.lost:
            self.problem("journal-damaged", f"{why}: data written then may be lost",
                         fixable=False)
        if self.f.read_only:
            if scan.txns:
                self.problem("journal-pending", f"{len(scan.txns)} committed transactions "
                             f"not yet replayed (open read-write to replay)")
            return
        if (scan.damaged or scan.lost) and not self.repair:
            return  # leave the evidence for --repair
        self.rep.replayed = j.replay(scan=scan).replayed
        if scan.damaged or scan.lost:
            self.rep.repaired.append("replayed what the journal holds and reset it")
        if problems and self.repair:
            for bno, g in ((JSB_A, j.sb_gen + 1), (JSB_B, j.sb_gen + 2)):
                self.f.pwrite(bno * mb.META, _jsb_block(bno, g, j.start_seq, j.start_off))
            self.f.flush()
            self.rep.repaired.append("rewrote the journal superblocks")

    def bitmap(self, res: int) -> bytearray | None:
        """The bits of a resource, or None if any bitmap block is damaged."""
        start = self.geom.bitmap_start(res)
        out = bytearray()
        sound = True
        for b in range(self.geom.bitmap_blocks(res)):
            buf = self.read(start + b)
            try:
                mb.verify(buf, mb.KIND_BITMAP, start + b)
            except mb.CorruptMetadata as e:
                self.problem("bad-checksum", str(e))
                sound = False
            out += buf[mb.HDR:]
        count = self.geom.resource_count(res)
        # even a damaged bitmap tells which units held data: a hint for repair
        self.raw_bits[res] = int.from_bytes(out, "little") & ((1 << count) - 1)
        return out if sound else None

    def descriptor(self, i: int) -> None:
        g = self.geom
        bno = g.desc_start + i
        buf = self.read(bno)
        suspect = False
        try:
            mb.verify(buf, mb.KIND_DESC, bno)
            info = bm.read_desc(buf, i)
        except mb.CorruptMetadata as e:
            salvaged = self.salvage_descriptor(i, buf, e)
            if salvaged is None:
                return
            info = salvaged
            suspect = True
        if not info.in_use:
            if any(bm.get_u64(buf, bm.slot_offset(s)) for s in range(bm.N_SLOTS)):
                self.problem("stale-descriptor", f"free descriptor {i} still holds pointers")
                if self.repair:
                    buf[bm.PTR_OFF:] = bytes(mb.META - bm.PTR_OFF)
                    self.dirty.add(bno)
            return
        self.used_desc.add(i)
        self.rep.files += 1
        if info.name in self.names:
            self.problem("duplicate-name", f"descriptors {self.names[info.name]} and {i} are "
                         f"both named {info.name!r}", fixable=False)
        self.names[info.name] = i
        nblocks = bm.file_blocks(g, info.size)
        if info.size <= 0 or nblocks > bm.MAX_FILE_BLOCKS:
            self.problem("bad-descriptor", f"file {info.name!r}: impossible size "
                         f"{info.size}", fixable=False)
            return
        ctx = _File(i, info.name, info.size, nblocks)
        if info.incomplete:
            self.problem("incomplete-disk", f"disk {info.name!r} is incomplete: an import "
                         f"into it did not finish (repair removes it)")
            if self.repair:
                ctx.rollback = True
                self.rollback_desc.append(i)
        for slot in range(bm.N_SLOTS):
            p = bm.get_u64(buf, bm.slot_offset(slot))
            if slot < bm.N_DIRECT:
                self.visit(ctx, p, bno, bm.slot_offset(slot), 0, slot, 1,
                           f"direct slot {slot}", suspect)
            else:
                depth = slot - bm.N_DIRECT + 1
                first = bm.N_DIRECT + sum(bm.P ** d for d in range(1, depth))
                self.visit(ctx, p, bno, bm.slot_offset(slot), depth, first, bm.P ** depth,
                           f"indirect slot {slot}", suspect)

    def salvage_descriptor(self, i: int, buf: bytearray,
                           err: mb.CorruptMetadata) -> bm.DescInfo | None:
        """A descriptor that fails its checksum is rebuilt from what it still
        holds (name, size, block map), never dropped with its data: every
        pointer in it is then checked against the bitmaps before it counts."""
        g = self.geom
        bno = g.desc_start + i
        flags, nlen, size, created, _r, raw = bm._DESC.unpack_from(buf, mb.HDR)
        has_ptrs = any(bm.get_u64(buf, bm.slot_offset(s)) for s in range(bm.N_SLOTS))
        in_use = has_ptrs or (flags & bm.DESC_IN_USE and 0 < nlen <= bm.NAME_MAX and size > 0)
        if not in_use:
            self.problem("bad-checksum", f"{err} (a free descriptor: repair clears it)")
            if self.repair:
                new = mb.new_block(mb.KIND_DESC, bno)
                bm.write_desc(new, in_use=False, name="", size=0, created_ns=0)
                self.blocks[bno] = new
                self.dirty.add(bno)
                self.rep.repaired.append(f"cleared damaged free descriptor {i}")
            return None
        try:
            name = bytes(raw[:nlen]).decode() if 0 < nlen <= bm.NAME_MAX else ""
        except UnicodeDecodeError:
            name = ""
        if not name or "/" in name:
            name = f"lost+found-{i}"
        limit = bm.MAX_FILE_BLOCKS * g.block_size
        if not 0 < size <= limit:
            last = max(s for s in range(bm.N_SLOTS) if bm.get_u64(buf, bm.slot_offset(s)))
            if last < bm.N_DIRECT:
                size = (last + 1) * g.block_size
            else:
                depth = last - bm.N_DIRECT + 1
                size = min(limit, (bm.N_DIRECT + sum(bm.P ** d for d in range(1, depth + 1)))
                           * g.block_size)
        self.problem("bad-checksum", f"{err} (repair rebuilds it from its contents as "
                     f"disk {name!r} of {size} bytes)")
        if self.repair:
            new = mb.new_block(mb.KIND_DESC, bno)
            new[bm.PTR_OFF:] = buf[bm.PTR_OFF:]
            bm.write_desc(new, in_use=True, name=name, size=size, created_ns=created)
            struct.pack_into("<Q", new, 24, mb.header(buf)[6])  # keep its generation
            self.blocks[bno] = new
            self.dirty.add(bno)
            self.rep.repaired.append(f"rebuilt descriptor {i} (disk {name!r}) from its "
                                     f"contents")
        return bm.DescInfo(i, True, name, size, created)

    def pointer_fault(self, ctx: "_File", ptr: int, depth: int, first: int,
                      suspect: bool) -> str:
        """Why a pointer cannot be followed ("" if it can)."""
        g = self.geom
        try:
            kind, unit = bm.decode_ptr(ptr, g)
        except bm.PointerOutOfRange as e:
            return str(e)
        want = (bm.PK_PTR,) if depth else (bm.PK_BLOCK, bm.PK_SUB)
        if kind not in want:
            return (f"holds a {bm.PK_NAMES[kind]} pointer where a "
                    f"{' or '.join(bm.PK_NAMES[k] for k in want)} belongs")
        if first >= ctx.nblocks:
            return f"maps file block {first}, past the end ({ctx.nblocks} blocks)"
        if depth == 0 and kind != bm.leaf_kind(g, ctx.size, first):
            return (f"block {first} is a {bm.PK_NAMES[kind]}, the size calls for a "
                    f"{bm.PK_NAMES[bm.leaf_kind(g, ctx.size, first)]}")
        if suspect and not self.raw_bits.get(bm.resource_of(kind), 0) >> unit & 1:
            return f"in a damaged block, names free {bm.PK_NAMES[kind]} {unit}"
        return ""

    def visit(self, ctx: "_File", ptr: int, container: int, off: int, depth: int,
              first: int, span: int, where: str, suspect: bool) -> None:
        if ptr == 0:
            return
        g = self.geom
        fault = self.pointer_fault(ctx, ptr, depth, first, suspect)
        if fault:
            self.bad.append(_BadPtr(ctx, ptr, container, off, depth, first, span, where,
                                    fault))
            return
        kind, unit = bm.decode_ptr(ptr, g)
        res = bm.resource_of(kind)
        ref = _Ref(f"file {ctx.name!r} {where}", container, off, ctx.index)
        if unit in self.refs[res]:
            other = self.refs[res][unit]
            self.problem("double-allocation", f"{bm.PK_NAMES[kind]} {unit} is used by "
                         f"{other.owner} and by {ref.owner}")
            self.dups.append((res, unit, ref))
            return
        self.refs[res][unit] = ref
        if ctx.rollback:
            self.rollback.add((res, unit))
        if not depth:
            return
        pbno = g.ptr_start + unit
        pbuf = self.read(pbno)
        sub_suspect = suspect
        try:
            mb.verify(pbuf, mb.KIND_PTR, pbno)
        except mb.CorruptMetadata as e:
            self.problem("bad-checksum", f"file {ctx.name!r}: {e} (repair keeps the "
                         f"pointers in it that check out)")
            sub_suspect = True
            if self.repair:
                new = mb.new_block(mb.KIND_PTR, pbno)
                new[mb.HDR:] = pbuf[mb.HDR:]
                struct.pack_into("<Q", new, 24, mb.header(pbuf)[6])
                self.blocks[pbno] = pbuf = new
                self.dirty.add(pbno)
                self.rep.repaired.append(f"resealed pointer block {unit} of file "
                                         f"{ctx.name!r}")
        sub = span // bm.P
        for j in range(bm.P):
            p = bm.get_u64(pbuf, bm.entry_offset(j))
            if p:
                self.visit(ctx, p, pbno, bm.entry_offset(j), depth - 1, first + j * sub,
                           sub, f"pointer block {unit}[{j}]", sub_suspect)

    def mend_pointers(self) -> None:
        """A damaged pointer that differs in one byte from exactly one unit
        nothing else references (still marked used) is taken to be that
        unit's pointer; any other damaged pointer is cleared, and the data it
        led to is left for lost+found."""
        g = self.geom
        for b in self.bad:
            if b.depth:
                kinds = (bm.PK_PTR,)
            else:
                kinds = (bm.leaf_kind(g, b.ctx.size, b.first),) if b.first < b.ctx.nblocks \
                    else ()
            found = set()
            for kind in kinds:
                res = bm.resource_of(kind)
                bits, taken = self.raw_bits.get(res, 0), self.refs[res]
                for byte in range(8):
                    for v in range(256):
                        cand = (b.ptr & ~(0xFF << 8 * byte)) | (v << 8 * byte)
                        if cand == b.ptr or cand >> 62 != kind:
                            continue
                        unit = cand & ((1 << 48) - 1)
                        if (cand >> 48) & 0x3FFF or unit >= g.resource_count(res):
                            continue
                        if bits >> unit & 1 and unit not in taken:
                            found.add(cand)
            where = f"file {b.ctx.name!r}: {b.where}"
            if len(found) == 1:
                good = found.pop()
                self.problem("pointer-damaged", f"{where}: pointer {b.ptr:#x} {b.fault}; "
                             f"repair restores {good:#x}")
                if self.repair:
                    bm.set_u64(self.read(b.container), b.off, good)
                    self.dirty.add(b.container)
                    self.rep.repaired.append(f"restored the pointer at {where}")
                self.visit(b.ctx, good, b.container, b.off, b.depth, b.first, b.span,
                           b.where, False)
                continue
            self.problem("pointer-out-of-range", f"{where}: pointer {b.ptr:#x} {b.fault}")
            self.clear(b.container, b.off)

    def roll_back(self) -> None:
        """Remove disks whose import never finished, freeing what they hold."""
        g = self.geom
        for i in self.rollback_desc:
            bno = g.desc_start + i
            info = bm.read_desc(self.read(bno), i)
            new = mb.new_block(mb.KIND_DESC, bno)
            bm.write_desc(new, in_use=False, name="", size=0, created_ns=0)
            self.blocks[bno] = new
            self.dirty.add(bno)
            self.used_desc.discard(i)
            self.names.pop(info.name, None)
            self.rep.files -= 1
            self.rep.repaired.append(f"removed incomplete disk {info.name!r}")
        for res, unit in self.rollback:
            self.refs[res].pop(unit, None)

    def lost_and_found(self) -> None:
        """Units still marked used that nothing references and that hold
        data become disks named lost+found; empty ones are freed. Nothing
        with data is freed: if no descriptor is left, the units stay
        allocated and the report says so."""
        g = self.geom
        orphans: dict[int, list[int]] = {}
        for res in (RES_BLOCK, RES_SUB):
            taken = set(self.refs[res]) | {u for r, u in self.rollback if r == res}
            bits = self.raw_bits.get(res, 0) & ~_bits_of(taken, g.resource_count(res))
            units = []
            while bits:
                low = bits & -bits
                unit = low.bit_length() - 1
                bits ^= low
                if self.holds_data(res, unit):
                    units.append(unit)
            orphans[res] = units
        plan: list[tuple[int, list[int]]] = []
        blocks = orphans[RES_BLOCK]
        for k in range(0, len(blocks), bm.N_DIRECT):
            plan.append((RES_BLOCK, blocks[k:k + bm.N_DIRECT]))
        plan += [(RES_SUB, [u]) for u in orphans[RES_SUB]]
        free = [i for i in range(g.max_files) if i not in self.used_desc
                and not self.desc_in_use(i)]
        kept = 0
        for res, units in plan:
            if not free:
                for u in units:
                    self.refs[res][u] = _Ref("unplaced data", -1, -1, -1)
                kept += len(units)
                continue
            i = free.pop(0)
            name = "lost+found"
            n = 2
            while name in self.names:
                name, n = f"lost+found-{n}", n + 1
            self.names[name] = i
            size = len(units) * (g.block_size if res == RES_BLOCK else g.sub_block_size)
            bno = g.desc_start + i
            new = mb.new_block(mb.KIND_DESC, bno)
            bm.write_desc(new, in_use=True, name=name, size=size, created_ns=time.time_ns())
            kind = bm.PK_BLOCK if res == RES_BLOCK else bm.PK_SUB
            for slot, u in enumerate(units):
                bm.set_u64(new, bm.slot_offset(slot), bm.make_ptr(kind, u))
                self.refs[res][u] = _Ref(f"file {name!r} direct slot {slot}", bno,
                                         bm.slot_offset(slot), i)
            self.blocks[bno] = new
            self.dirty.add(bno)
            self.rep.files += 1
            self.rep.repaired.append(f"moved {len(units)} {RESOURCE_NAMES[res]}s that "
                                     f"hold data but belong to no disk into {name!r}")
            self.problem("lost-found", f"{len(units)} {RESOURCE_NAMES[res]}s with data "
                         f"lost their place in a disk; they are now in {name!r}",
                         fixable=False)
        if kept:
            self.problem("lost-found", f"{kept} units hold data that belongs to no disk, "
                         f"and no descriptor is free for lost+found: left allocated",
                         fixable=False)

    def desc_in_use(self, i: int) -> bool:
        buf = self.read(self.geom.desc_start + i)
        try:
            return bm.read_desc(buf, i).in_use or any(
                bm.get_u64(buf, bm.slot_offset(s)) for s in range(bm.N_SLOTS))
        except mb.CorruptMetadata:
            return True

    def holds_data(self, res: int, unit: int) -> bool:
        """Whether a unit holds any non-zero byte (holes are skipped)."""
        g = self.geom
        off = g.block_offset(unit) if res == RES_BLOCK else g.sub_block_offset(unit)
        length = g.block_size if res == RES_BLOCK else g.sub_block_size
        for start, n in data_extents(self.f.fd, off, off + length):
            for pos in range(start, start + n, 1 << 20):
                chunk = self.f.pread(pos, min(1 << 20, start + n - pos))
                if chunk.count(0) != len(chunk):
                    return True
        return False

    def truncation(self, refs) -> None:
        """A file shorter than its geometry: data units past the end are lost
        (reported, never fixable); repair restores the file's length."""
        g, size = self.geom, self.f.size()
        if size >= g.file_size:
            return
        lost: dict[str, int] = {}
        for res, offset_of, length in ((RES_BLOCK, g.block_offset, g.block_size),
                                       (RES_SUB, g.sub_block_offset, g.sub_block_size)):
            for unit, ref in refs[res].items():
                if offset_of(unit) + length > size:
                    disk = ref.owner.split(" ", 2)[1]
                    lost[disk] = lost.get(disk, 0) + 1
        self.problem("truncated", f"file is {size} bytes, the volume needs {g.file_size}")
        for disk, n in sorted(lost.items()):
            self.problem("truncated", f"disk {disk}: {n} data blocks lay past the end of "
                         f"the file; their data is lost", fixable=False)
        if self.repair:
            self.f.truncate(g.file_size)
            self.rep.repaired.append(f"restored the file's length to {g.file_size} bytes")

    def clear(self, container: int, off: int) -> None:
        if self.repair:
            bm.set_u64(self.read(container), off, 0)
            self.dirty.add(container)
            self.rep.repaired.append(f"cleared the pointer at block {container}+{off}")

    def compare(self, res: int, bits: bytearray | None, refs: dict[int, _Ref]) -> None:
        if bits is None:
            return  # rebuilt from the references on repair
        name = RESOURCE_NAMES[res]
        count = self.geom.resource_count(res)
        set_bits = int.from_bytes(bits, "little") & ((1 << count) - 1)
        ref_bits = _bits_of(refs, count)
        leaked, missing = set_bits & ~ref_bits, ref_bits & ~set_bits
        for kind_bits, code, text in ((leaked, "leaked-block", "is marked used but "
                                       "nothing references it"),
                                      (missing, "unallocated-reference", "is referenced "
                                       "but marked free")):
            n = 0
            while kind_bits:
                low = kind_bits & -kind_bits
                unit = low.bit_length() - 1
                kind_bits ^= low
                owner = f" (by {refs[unit].owner})" if unit in refs else ""
                if n < 1000:
                    self.problem(code, f"{name} {unit} {text}{owner}")
                n += 1
            if n > 1000:
                self.problem(code, f"... and {n - 1000} more {name}s")

    def fix_duplicates(self, dups: list[tuple[int, int, _Ref]], refs) -> None:
        g = self.geom
        for res, unit, ref in dups:
            if res == RES_PTR:
                self.clear(ref.container, ref.offset)
                continue
            count = g.resource_count(res)
            free = next((u for u in range(count) if u not in refs[res]), None)
            if free is None:
                self.clear(ref.container, ref.offset)
                continue
            kind = bm.PK_SUB if res == RES_SUB else bm.PK_BLOCK
            src = g.sub_block_offset(unit) if res == RES_SUB else g.block_offset(unit)
            dst = g.sub_block_offset(free) if res == RES_SUB else g.block_offset(free)
            length = g.sub_block_size if res == RES_SUB else g.block_size
            for pos in range(0, length, 1 << 20):
                n = min(1 << 20, length - pos)
                self.f.pwrite(dst + pos, self.f.pread(src + pos, n))
            bm.set_u64(self.read(ref.container), ref.offset, bm.make_ptr(kind, free))
            self.dirty.add(ref.container)
            refs[res][free] = ref
            self.rep.repaired.append(f"gave {ref.owner} its own copy of "
                                     f"{bm.PK_NAMES[kind]} {unit} in {free}")

    def rebuild_bitmaps(self, refs) -> None:
        g = self.geom
        for res in (RES_BLOCK, RES_SUB, RES_PTR):
            start = g.bitmap_start(res)
            value = _bits_of(refs[res], g.resource_count(res))
            raw = value.to_bytes(g.bitmap_blocks(res) * mb.PAYLOAD, "little")
            for b in range(g.bitmap_blocks(res)):
                new = mb.new_block(mb.KIND_BITMAP, start + b)
                new[mb.HDR:] = raw[b * mb.PAYLOAD:(b + 1) * mb.PAYLOAD]
                old = self.read(start + b)
                if not mb.is_sound(old, mb.KIND_BITMAP, start + b) or old[mb.HDR:] != new[mb.HDR:]:
                    self.blocks[start + b] = new
                    self.dirty.add(start + b)
                    self.rep.repaired.append(f"rewrote {RESOURCE_NAMES[res]} bitmap block {b}")

    def write_back(self) -> None:
        for bno in sorted(self.dirty):
            self.f.pwrite(bno * mb.META, mb.seal(self.blocks[bno]))
        self.f.flush()


def check_volume(path: str, *, repair: bool = False,
                 progress: Callable[[str], None] = lambda s: None,
                 host: HostFile | None = None) -> CheckReport:
    """Check (and with ``repair`` fix) the volume at ``path``. With repair,
    the returned report is that of the first pass, and ``repaired`` lists
    what was changed; call again to confirm the volume is now clean."""
    f = host or HostFile(path, read_only=False)
    try:
        return _Checker(f, repair, progress).run()
    finally:
        if host is None:
            f.close()


__all__ = ["check_volume", "CheckReport", "Problem", "EXIT_CLEAN", "EXIT_CORRECTED",
           "EXIT_UNCORRECTED", "StorageError", "BITS_PER_BITMAP_BLOCK"]
