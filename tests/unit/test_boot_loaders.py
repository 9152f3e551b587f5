"""bzImage, PVH and payload extraction against images built here, and against
real kernels: Debian's linux-image-cloud-amd64 and hvkit's microVM kernel
(guests/linux/build.sh)."""
from __future__ import annotations

import bz2
import glob
import gzip
import lzma
import os
import struct

import pytest

from hvkit.boot import layout
from hvkit.boot.bzimage import (ENTRY64_OFFSET, load_bzimage, parse_setup_header)
from hvkit.boot.extract import compression_of, decompress, extract_vmlinux, payload
from hvkit.boot.kernel import load_linux
from hvkit.boot.linux import E820_RAM, E820_RESERVED, place_initrd
from hvkit.boot.pvh import (HVM_START_MAGIC, MEMMAP_ENTRY, MODLIST_ENTRY, START_INFO,
                            load_pvh, parse_pvh)
from hvkit.errors import GuestLoadError
from hvkit.memory.guest import GuestMemory

MiB = 1 << 20

# ---------------------------------------------------------------- builders


def make_elf(entry_note: int | None = 0x1000010, *, paddr: int = 0x1000000,
             code: bytes = b"\xf4" * 64, bss: int = 0x1000, note_owner: bytes = b"Xen\0",
             note_type: int = 18, desc_size: int = 8, machine: int = 62) -> bytes:
    """A minimal x86-64 ELF kernel: one PT_LOAD (code + bss) and, unless
    ``entry_note`` is None, a PT_NOTE with the PVH entry note."""
    ehdr_size, phdr_size = 64, 56
    note = b""
    if entry_note is not None:
        desc = entry_note.to_bytes(desc_size, "little")
        note = struct.pack("<III", len(note_owner), len(desc), note_type) + note_owner
        note += b"\0" * (-len(note) % 4) + desc + b"\0" * (-len(desc) % 4)
    nph = 2 if note else 1
    note_off = ehdr_size + nph * phdr_size
    code_off = (note_off + len(note) + 0xFFF) & ~0xFFF
    ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    ehdr += struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, 0xFFFFFFFF81000000, ehdr_size, 0,
                        0, ehdr_size, phdr_size, nph, 64, 0, 0)
    phdrs = struct.pack("<IIQQQQQQ", 1, 5, code_off, 0xFFFFFFFF81000000, paddr,
                        len(code), len(code) + bss, 0x1000)
    if note:
        phdrs += struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(note), len(note), 4)
    out = bytearray(ehdr + phdrs + note)
    out += bytes(code_off - len(out))
    out += code
    return bytes(out)


def make_bzimage(*, version: int = 0x020F, xloadflags: int = 1, loadflags: int = 1,
                 relocatable: bool = True, pref_address: int = 0x1000000,
                 init_size: int = 0x400000, setup_sects: int = 4,
                 initrd_addr_max: int = 0x7FFFFFFF, cmdline_size: int = 2047,
                 payload_data: bytes | None = None, magic: bytes = b"HdrS") -> bytes:
    """A bzImage-shaped file: boot sector + setup header, setup code, and a
    protected-mode part that holds ``payload_data`` (default: a gzip of
    ``make_elf()``) after a 0x100-byte stub."""
    if payload_data is None:
        payload_data = gzip.compress(make_elf(), mtime=0)
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200] = 0xEB
    setup[0x201] = 0x26C - 0x202
    setup[0x202:0x206] = magic
    struct.pack_into("<H", setup, 0x206, version)
    struct.pack_into("<H", setup, 0x20E, 0x400 - 0x200)       # kernel_version string
    setup[0x400:0x400 + 20] = b"6.1.0-synthetic #1\0\0"
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x214, 0x100000)
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, 0x200000)
    setup[0x234] = 1 if relocatable else 0
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    stub = b"\x90" * 0x100
    struct.pack_into("<II", setup, 0x248, len(stub), len(payload_data))
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + stub + payload_data


def e820_for(mem: GuestMemory) -> list[tuple[int, int, int]]:
    return [(0, 0x9FC00, E820_RAM), (0x9FC00, 0x100000 - 0x9FC00, E820_RESERVED),
            (0x100000, mem.end - 0x100000, E820_RAM)]


@pytest.fixture
def mem():
    m = GuestMemory.create(64 * MiB)
    yield m
    for r in list(m.regions):
        m.remove_region(r)


# ---------------------------------------------------------------- bzImage


def test_bzimage_zero_page_and_registers(mem):
    image = make_bzimage()
    initrd = os.urandom(5000)
    e820 = e820_for(mem)
    boot = load_bzimage(mem, image, "console=ttyS0 quiet", initrd, e820)
    assert boot.mode == "long64"
    assert boot.kernel_start == 0x1000000            # relocatable: pref_address
    assert boot.entry == 0x1000000 + ENTRY64_OFFSET
    assert boot.regs == {"rip": boot.entry, "rsi": layout.ZERO_PAGE_ADDR}
    zp = mem.read(layout.ZERO_PAGE_ADDR, 4096)
    assert zp[0x202:0x206] == b"HdrS"
    assert zp[0x210] == 0xFF                          # type_of_loader
    assert zp[0x211] & 1                              # LOADED_HIGH kept
    assert struct.unpack_from("<I", zp, 0x214)[0] == 0x1000000
    assert struct.unpack_from("<I", zp, 0x228)[0] == layout.CMDLINE_ADDR
    rd_addr, rd_size = struct.unpack_from("<II", zp, 0x218)
    assert (rd_addr, rd_size) == (boot.initrd_addr, 5000)
    assert rd_addr % 4096 == 0 and rd_addr + rd_size <= mem.end
    assert rd_addr >= boot.kernel_end                 # not over the decompressing kernel
    assert mem.read(rd_addr, rd_size) == initrd
    assert zp[0x1E8] == 3
    table = [struct.unpack_from("<QQI", zp, 0x2D0 + 20 * i) for i in range(3)]
    assert table == e820
    assert mem.read(layout.CMDLINE_ADDR, 21) == b"console=ttyS0 quiet\0\0"[:21]
    # the protected-mode code (everything after the setup sectors) is at the load address
    setup_size = 5 * 512
    assert mem.read(0x1000000, 0x100) == image[setup_size:setup_size + 0x100]


def test_bzimage_non_relocatable_loads_at_code32_start(mem):
    boot = load_bzimage(mem, make_bzimage(relocatable=False), "x", None, e820_for(mem))
    assert boot.kernel_start == 0x100000
    assert boot.entry == 0x100200
    # it decompresses at pref_address (16 MiB): the initrd must stay clear of that
    assert boot.kernel_end == 0x1000000 + 0x400000
    assert boot.initrd_addr == 0 and boot.initrd_size == 0
    boot = load_bzimage(mem, make_bzimage(relocatable=False), "x", b"r" * 100, e820_for(mem))
    assert boot.initrd_addr >= 0x1400000


def test_bzimage_initrd_respects_initrd_addr_max(mem):
    limit = 0x2000000 - 1                             # 32 MiB
    boot = load_bzimage(mem, make_bzimage(initrd_addr_max=limit), "", b"x" * 10000,
                        e820_for(mem))
    assert boot.initrd_addr + boot.initrd_size <= limit + 1
    assert boot.initrd_addr > 0x1000000


@pytest.mark.parametrize("kwargs, message", [
    ({"magic": b"Nope"}, "no Linux setup header"),
    ({"version": 0x020A}, "too old"),
    ({"xloadflags": 0}, "XLF_KERNEL_64"),
    ({"loadflags": 0}, "zImage"),
])
def test_bzimage_refuses_bad_headers(mem, kwargs, message):
    with pytest.raises(GuestLoadError, match=message):
        load_bzimage(mem, make_bzimage(**kwargs), "", None, e820_for(mem))


def test_bzimage_refuses_what_does_not_fit(mem):
    with pytest.raises(GuestLoadError, match="needs guest RAM"):
        load_bzimage(mem, make_bzimage(init_size=80 * MiB), "", None, e820_for(mem))
    with pytest.raises(GuestLoadError, match="no room for a"):
        load_bzimage(mem, make_bzimage(), "", b"\0" * 60 * MiB, e820_for(mem))
    with pytest.raises(GuestLoadError, match="at most 2047"):
        load_bzimage(mem, make_bzimage(), "a" * 3000, None, e820_for(mem))
    with pytest.raises(GuestLoadError, match="ELF file"):
        load_bzimage(mem, make_elf(), "", None, e820_for(mem))
    bad = bytearray(make_bzimage())
    bad[0x201] = 0xF0
    with pytest.raises(GuestLoadError, match="past its room"):
        load_bzimage(mem, bytes(bad), "", None, e820_for(mem))
    with pytest.raises(GuestLoadError, match="too short"):
        load_bzimage(mem, b"\0" * 100, "", None, e820_for(mem))


def test_failed_load_writes_nothing(mem):
    before = mem.read(layout.ZERO_PAGE_ADDR, 4096)
    with pytest.raises(GuestLoadError):
        load_bzimage(mem, make_bzimage(), "ok", b"\0" * 63 * MiB, e820_for(mem))
    assert mem.read(layout.ZERO_PAGE_ADDR, 4096) == before
    assert mem.read(layout.CMDLINE_ADDR, 2) == b"\0\0"


def test_e820_that_lies_is_refused(mem):
    with pytest.raises(GuestLoadError, match="does not cover"):
        load_bzimage(mem, make_bzimage(), "", None, [(0, 128 * MiB, E820_RAM)])
    with pytest.raises(GuestLoadError, match="overlap"):
        load_bzimage(mem, make_bzimage(), "", None,
                     [(0, 2 * MiB, E820_RAM), (1 * MiB, 8 * MiB, E820_RAM)])


def test_place_initrd_picks_highest_fit():
    e820 = [(0, 0x9F000, E820_RAM), (0x100000, 0x700000, E820_RAM),
            (0x800000, 0x100000, E820_RESERVED)]
    assert place_initrd(e820, 0x1800, low=0x200000, limit=1 << 32) == 0x7FE000
    assert place_initrd(e820, 0x1000, low=0, limit=0x90000) == 0x8F000
    with pytest.raises(GuestLoadError):
        place_initrd(e820, 0x800000, low=0x100000, limit=1 << 32)


# ---------------------------------------------------------------- PVH


def test_pvh_start_info_modlist_memmap(mem):
    elf = make_elf(0x1000010)
    initrd = b"initrd-bytes" * 100
    e820 = e820_for(mem)
    boot = load_pvh(mem, elf, "console=ttyS0", initrd, e820)
    assert boot.mode == "pvh32"
    assert boot.entry == 0x1000010
    assert boot.regs == {"rip": 0x1000010, "rbx": layout.START_INFO_ADDR}
    fields = START_INFO.unpack(mem.read(layout.START_INFO_ADDR, START_INFO.size))
    magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, nmem, reserved = fields
    assert (magic, version, flags, nr_modules) == (HVM_START_MAGIC, 1, 0, 1)
    assert START_INFO.size == 56
    assert (modlist, cmdline, rsdp) == (layout.START_INFO_MODLIST_ADDR, layout.CMDLINE_ADDR, 0)
    assert (memmap, nmem, reserved) == (layout.START_INFO_MEMMAP_ADDR, 3, 0)
    paddr, size, mcmd, _ = MODLIST_ENTRY.unpack(mem.read(modlist, 32))
    assert (paddr, size, mcmd) == (boot.initrd_addr, len(initrd), 0)
    assert mem.read(paddr, size) == initrd
    got = [MEMMAP_ENTRY.unpack(mem.read(memmap + 24 * i, 24))[:3] for i in range(3)]
    assert got == e820
    assert mem.read(0x1000000, 64) == b"\xf4" * 64
    assert mem.read(0x1000040, 0x1000) == bytes(0x1000)    # bss zeroed
    assert mem.read(layout.CMDLINE_ADDR, 14) == b"console=ttyS0\0"


def test_pvh_without_initrd_has_no_modules(mem):
    load_pvh(mem, make_elf(), "", None, e820_for(mem))
    fields = START_INFO.unpack(mem.read(layout.START_INFO_ADDR, START_INFO.size))
    assert fields[3] == 0 and fields[4] == 0


def test_pvh_accepts_a_4_byte_note(mem):
    assert parse_pvh(make_elf(0x1000020, desc_size=4)).entry == 0x1000020


@pytest.mark.parametrize("elf, message", [
    (make_elf(None), "no PVH entry point"),
    (make_elf(note_owner=b"Lnx\0"), "no PVH entry point"),
    (make_elf(note_type=17), "no PVH entry point"),
    (make_elf(0x5000000), "not inside any loaded segment"),
    (make_elf(machine=3), "not x86-64"),
    (make_elf()[:0x1010], "runs past the end"),
    (b"MZ" + bytes(100), "not an ELF"),
])
def test_pvh_refuses_bad_images(mem, elf, message):
    with pytest.raises(GuestLoadError, match=message):
        load_pvh(mem, elf, "", None, e820_for(mem))


def test_pvh_refuses_a_kernel_beyond_ram(mem):
    with pytest.raises(GuestLoadError, match="RAM ends at"):
        load_pvh(mem, make_elf(0x8000010, paddr=0x8000000), "", None, e820_for(mem))


# ---------------------------------------------------------------- extraction


def _lz4_legacy(data: bytes) -> bytes:
    import lz4.block
    out = b"\x02\x21\x4c\x18"
    for i in range(0, len(data), 8 << 20):
        block = lz4.block.compress(data[i:i + (8 << 20)], store_size=False)
        out += struct.pack("<I", len(block)) + block
    return out + struct.pack("<I", len(data))


@pytest.mark.parametrize("kind", ["gzip", "xz", "lzma", "bzip2", "lz4", "zstd", "none"])
def test_extract_each_compression(kind):
    elf = make_elf() + os.urandom(3000)               # trailing data like the relocs
    if kind == "gzip":
        blob = gzip.compress(elf)
    elif kind == "xz":
        blob = lzma.compress(elf, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    elif kind == "lzma":
        blob = lzma.compress(elf, format=lzma.FORMAT_ALONE)
    elif kind == "bzip2":
        blob = bz2.compress(elf)
    elif kind == "lz4":
        blob = _lz4_legacy(elf)
    elif kind == "zstd":
        import zstandard
        blob = zstandard.ZstdCompressor().compress(elf)
    else:
        blob = elf
    if kind not in ("lz4", "none"):
        blob += struct.pack("<I", len(elf))           # the size the kernel appends
    image = make_bzimage(payload_data=blob)
    assert compression_of(payload(image)) == kind
    assert extract_vmlinux(image) == elf


def test_extract_refuses_corrupt_and_unknown():
    good = gzip.compress(make_elf())
    with pytest.raises(GuestLoadError, match="truncated|corrupt"):
        extract_vmlinux(make_bzimage(payload_data=good[:len(good) // 2]))
    with pytest.raises(GuestLoadError, match="unknown compression"):
        extract_vmlinux(make_bzimage(payload_data=b"\x12\x34" * 50))
    with pytest.raises(GuestLoadError, match="lzo"):
        decompress(b"\x89LZO\0" + bytes(20))
    with pytest.raises(GuestLoadError, match="not an ELF"):
        extract_vmlinux(make_bzimage(payload_data=gzip.compress(b"plain text")))
    image = make_bzimage()
    with pytest.raises(GuestLoadError, match="runs past the end"):
        extract_vmlinux(image[:-10])


def test_load_linux_dispatch(mem):
    e820 = e820_for(mem)
    assert load_linux(mem, make_elf(), "", None, e820).mode == "pvh32"
    assert load_linux(mem, make_bzimage(), "", None, e820).mode == "long64"
    boot = load_linux(mem, make_bzimage(), "", None, e820, boot="pvh")
    assert boot.mode == "pvh32" and boot.entry == 0x1000010
    with pytest.raises(GuestLoadError, match="neither"):
        load_linux(mem, b"\0" * 4096, "", None, e820)
    with pytest.raises(GuestLoadError, match="boot method"):
        load_linux(mem, make_elf(), "", None, e820, boot="uefi")


def test_linux_loaders_give_the_builder_an_entry_state(mem):
    from hvkit.vmm.loaders import linux_entry
    e820 = e820_for(mem)
    pvh = linux_entry(load_linux(mem, make_elf(), "", None, e820))
    assert pvh.mode == "protected" and pvh.rip == 0x1000010 and "rbx" in pvh.regs
    bz = linux_entry(load_linux(mem, make_bzimage(), "", None, e820))
    assert bz.mode == "long" and "rsi" in bz.regs and "rip" not in bz.regs


def test_layout_leaves_the_vmm_structures_alone():
    from hvkit.arch.x86 import layout as x86
    vmm = [(x86.GDT_ADDR, x86.BOOT_IDT_ADDR + 0x100),
           (x86.GUEST_ARGS_ADDR, x86.GUEST_ARGS_ADDR + x86.GUEST_ARGS_MAX),
           (x86.PML4_ADDR, x86.PD_ADDR + x86.PD_COUNT * 0x1000)]
    ours = [(a, b) for a, b, _ in layout.LOADER_RANGES]
    for a0, a1 in ours:
        for b0, b1 in vmm:
            assert a1 <= b0 or b1 <= a0, (hex(a0), hex(b0))
    for (a0, a1), (b0, b1) in zip(sorted(ours), sorted(ours)[1:]):
        assert a1 <= b0
    # boot stacks of up to 16 vCPUs stay above the command line
    assert x86.BOOT_STACK_TOP - 16 * x86.BOOT_STACK_SIZE >= layout.CMDLINE_ADDR + layout.CMDLINE_MAX


# ---------------------------------------------------------------- real kernels


def _debian_kernel() -> str | None:
    found = sorted(glob.glob("/boot/vmlinuz-*"))
    return found[-1] if found else None


def _hvkit_kernel_dir() -> str | None:
    env = os.environ.get("HVKIT_LINUX_DIR")
    if env:
        return env if os.path.isfile(os.path.join(env, "bzImage")) else None
    cache = os.path.join(os.environ.get("HVKIT_CACHE", os.path.expanduser("~/.cache/hvkit")),
                         "linux")
    dirs = [d for d in glob.glob(os.path.join(cache, "*"))
            if os.path.isfile(os.path.join(d, "bzImage")) and os.path.isfile(os.path.join(d, "vmlinux"))]
    return max(dirs, key=os.path.getmtime) if dirs else None


DEBIAN = _debian_kernel()
HVKIT = _hvkit_kernel_dir()
need_debian = pytest.mark.skipif(
    DEBIAN is None, reason="no /boot/vmlinuz-*: apt-get install linux-image-cloud-amd64")
need_hvkit = pytest.mark.skipif(
    HVKIT is None, reason="hvkit microVM kernel not built: run guests/linux/build.sh "
                          "(or set HVKIT_LINUX_DIR)")


@need_debian
def test_debian_bzimage_header_and_load():
    with open(DEBIAN, "rb") as f:
        data = f.read()
    hdr = parse_setup_header(data, DEBIAN)
    assert hdr.version >= 0x020C and hdr.relocatable
    assert hdr.kernel_version.split()[0] in DEBIAN
    m = GuestMemory.create(256 * MiB)
    boot = load_bzimage(m, DEBIAN, "console=ttyS0", b"\0" * 4096, e820_for(m))
    assert boot.entry == hdr.pref_address + 0x200
    assert boot.initrd_addr >= boot.kernel_end
    assert m.read(boot.kernel_start, 64) == data[hdr.setup_size:hdr.setup_size + 64]


@need_debian
def test_debian_kernel_extracts_and_boots_through_pvh():
    with open(DEBIAN, "rb") as f:
        data = f.read()
    vmlinux = extract_vmlinux(data, DEBIAN)
    image = parse_pvh(vmlinux, DEBIAN)                # Debian builds CONFIG_PVH=y
    assert image.start == 0x1000000
    m = GuestMemory.create(256 * MiB)
    boot = load_linux(m, DEBIAN, "console=ttyS0", b"rd", e820_for(m), boot="pvh")
    assert boot.entry == image.entry and boot.kernel_end == image.end


@need_hvkit
def test_hvkit_kernel_bzimage_and_vmlinux_agree():
    bz = os.path.join(HVKIT, "bzImage")
    vm = os.path.join(HVKIT, "vmlinux")
    with open(bz, "rb") as f:
        data = f.read()
    assert compression_of(payload(data)) == "lz4"
    extracted = parse_pvh(extract_vmlinux(data, bz), bz)
    with open(vm, "rb") as f:
        direct = parse_pvh(f.read(), vm)
    assert extracted.entry == direct.entry
    assert [(s.paddr, s.memsz) for s in extracted.segments] == \
           [(s.paddr, s.memsz) for s in direct.segments]
    m = GuestMemory.create(128 * MiB)
    boot = load_linux(m, vm, "console=ttyS0", b"\0" * 8192, e820_for(m))
    assert boot.mode == "pvh32" and boot.regs["rip"] == direct.entry
    boot = load_linux(m, bz, "console=ttyS0", None, e820_for(m))
    assert boot.mode == "long64" and boot.protocol.startswith("2.")
