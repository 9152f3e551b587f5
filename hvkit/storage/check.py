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

from dataclasses import dataclass, field
from typing import Callable

from hvkit.storage import blockmap as bm
from hvkit.storage import metablock as mb
from hvkit.storage.backend import StorageError
from hvkit.storage.hostfile import HostFile
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


class _Checker:
    def __init__(self, f: HostFile, repair: bool, progress: Callable[[str], None]) -> None:
        self.f = f
        self.repair = repair
        self.progress = progress
        self.rep = CheckReport(f.path)
        self.blocks: dict[int, bytearray] = {}
        self.dirty: set[int] = set()

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
        refs: dict[int, dict[int, _Ref]] = {r: {} for r in bits}
        dups: list[tuple[int, int, _Ref]] = []
        names: dict[str, int] = {}
        for i in range(geom.max_files):
            self.descriptor(i, refs, dups, names)
        self.progress("comparing references with bitmaps")
        for r in (RES_BLOCK, RES_SUB, RES_PTR):
            self.compare(r, bits[r], refs[r])
        self.truncation(refs)
        if self.repair:
            self.fix_duplicates(dups, refs)
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
        return out if sound else None

    def descriptor(self, i: int, refs, dups, names) -> None:
        g = self.geom
        bno = g.desc_start + i
        buf = self.read(bno)
        try:
            mb.verify(buf, mb.KIND_DESC, bno)
            info = bm.read_desc(buf, i)
        except mb.CorruptMetadata as e:
            self.problem("bad-checksum", f"{e} (repair removes this descriptor and the "
                         f"disk it held)")
            if self.repair:
                new = mb.new_block(mb.KIND_DESC, bno)
                bm.write_desc(new, in_use=False, name="", size=0, created_ns=0)
                self.blocks[bno] = new
                self.dirty.add(bno)
                self.rep.repaired.append(f"removed damaged descriptor {i}")
            return
        if not info.in_use:
            if any(bm.get_u64(buf, bm.slot_offset(s)) for s in range(bm.N_SLOTS)):
                self.problem("stale-descriptor", f"free descriptor {i} still holds pointers")
                if self.repair:
                    buf[bm.PTR_OFF:] = bytes(mb.META - bm.PTR_OFF)
                    self.dirty.add(bno)
            return
        self.rep.files += 1
        if info.name in names:
            self.problem("duplicate-name", f"descriptors {names[info.name]} and {i} are "
                         f"both named {info.name!r}", fixable=False)
        names[info.name] = i
        nblocks = bm.file_blocks(g, info.size)
        if info.size <= 0 or nblocks > bm.MAX_FILE_BLOCKS:
            self.problem("bad-descriptor", f"file {info.name!r}: impossible size "
                         f"{info.size}", fixable=False)
            return

        def visit(ptr: int, container: int, off: int, depth: int, first: int, span: int,
                  where: str) -> None:
            if ptr == 0:
                return
            try:
                kind, unit = bm.decode_ptr(ptr, g, where=f" at {where}")
            except bm.PointerOutOfRange as e:
                self.problem("pointer-out-of-range", f"file {info.name!r}: {e}")
                self.clear(container, off)
                return
            want = (bm.PK_PTR,) if depth else (bm.PK_BLOCK, bm.PK_SUB)
            if kind not in want:
                self.problem("pointer-out-of-range", f"file {info.name!r}: {where} holds "
                             f"a {bm.PK_NAMES[kind]} pointer where a "
                             f"{' or '.join(bm.PK_NAMES[k] for k in want)} belongs")
                self.clear(container, off)
                return
            if first >= nblocks:
                self.problem("pointer-out-of-range", f"file {info.name!r}: {where} maps "
                             f"file block {first}, past the end ({nblocks} blocks)")
                self.clear(container, off)
                return
            if depth == 0 and kind != bm.leaf_kind(g, info.size, first):
                self.problem("pointer-out-of-range", f"file {info.name!r}: block {first} "
                             f"is a {bm.PK_NAMES[kind]}, the size calls for a "
                             f"{bm.PK_NAMES[bm.leaf_kind(g, info.size, first)]}")
                self.clear(container, off)
                return
            res = bm.resource_of(kind)
            ref = _Ref(f"file {info.name!r} {where}", container, off, i)
            if unit in refs[res]:
                other = refs[res][unit]
                self.problem("double-allocation", f"{bm.PK_NAMES[kind]} {unit} is used by "
                             f"{other.owner} and by {ref.owner}")
                dups.append((res, unit, ref))
                return
            refs[res][unit] = ref
            if depth:
                pbno = g.ptr_start + unit
                pbuf = self.read(pbno)
                try:
                    mb.verify(pbuf, mb.KIND_PTR, pbno)
                except mb.CorruptMetadata as e:
                    self.problem("bad-checksum", f"file {info.name!r}: {e} (repair drops "
                                 f"the {span} blocks it maps)")
                    del refs[res][unit]
                    self.clear(container, off)
                    return
                sub = span // bm.P
                for j in range(bm.P):
                    p = bm.get_u64(pbuf, bm.entry_offset(j))
                    if p:
                        visit(p, pbno, bm.entry_offset(j), depth - 1, first + j * sub, sub,
                              f"pointer block {unit}[{j}]")

        for slot in range(bm.N_SLOTS):
            p = bm.get_u64(buf, bm.slot_offset(slot))
            if slot < bm.N_DIRECT:
                visit(p, bno, bm.slot_offset(slot), 0, slot, 1, f"direct slot {slot}")
            else:
                depth = slot - bm.N_DIRECT + 1
                first = bm.N_DIRECT + sum(bm.P ** d for d in range(1, depth))
                visit(p, bno, bm.slot_offset(slot), depth, first, bm.P ** depth,
                      f"indirect slot {slot}")

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
        ref_bits = 0
        for unit in refs:
            ref_bits |= 1 << unit
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
            value = 0
            for unit in refs[res]:
                value |= 1 << unit
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
