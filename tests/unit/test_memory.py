import pytest

from hvkit.errors import ConfigError, GuestMemoryError
from hvkit.memory.guest import GuestMemory, MemoryRegion


def test_read_write_roundtrip_and_zero_fill():
    with GuestMemory.create(1 << 20) as mem:
        assert mem.read(0x1000, 4) == b"\0\0\0\0"
        mem.write(0x1000, b"abcd")
        mem.write_u32(0x2000, 0xDEADBEEF)
        assert mem.read(0x1000, 4) == b"abcd"
        assert mem.read_u32(0x2000) == 0xDEADBEEF
        assert mem.read_u8(0x2000) == 0xEF


def test_view_is_zero_copy():
    with GuestMemory.create(1 << 20) as mem:
        v = mem.view(0x3000, 16)
        v[0:3] = b"xyz"
        assert mem.read(0x3000, 3) == b"xyz"
        mem.write(0x3003, b"!")
        assert bytes(v[3:4]) == b"!"
        v.release()


@pytest.mark.parametrize("gpa,size", [(1 << 20, 1), ((1 << 20) - 2, 4), (-1, 1), (0, -1),
                                      (1 << 40, 8)])
def test_out_of_bounds_is_refused(gpa, size):
    with GuestMemory.create(1 << 20) as mem:
        with pytest.raises(GuestMemoryError) as info:
            mem.read(gpa, size)
        assert hex(gpa) in str(info.value) or "invalid" in str(info.value)
        if size > 0:
            with pytest.raises(GuestMemoryError):
                mem.write(gpa, b"\0" * size)
        assert not mem.contains(gpa, size)


def test_several_regions_and_spanning_access():
    mem = GuestMemory([MemoryRegion(0, 0x10000), MemoryRegion(0x10000, 0x10000, name="b"),
                       MemoryRegion(0x100000, 0x1000, name="far")])
    try:
        mem.write(0xFFFE, b"1234")          # crosses two adjacent regions
        assert mem.read(0xFFFE, 4) == b"1234"
        assert mem.region_of(0x10001).name == "b"
        with pytest.raises(GuestMemoryError):
            mem.read(0x1FFFE, 4)             # runs into the hole
        with pytest.raises(GuestMemoryError):
            mem.view(0xFFFE, 4)              # a view must be in one region
        assert mem.size == 0x21000
        assert mem.end == 0x101000
    finally:
        mem.close()


def test_overlapping_regions_are_refused():
    mem = GuestMemory([MemoryRegion(0, 0x10000, name="a")])
    try:
        with pytest.raises(ConfigError, match="overlaps 'a'"):
            mem.add_region(MemoryRegion(0x8000, 0x10000, name="b"))
    finally:
        mem.close()


def test_bad_region_shapes():
    with pytest.raises(ConfigError, match="multiple"):
        MemoryRegion(0, 1000).open()
    with pytest.raises(ConfigError, match="aligned"):
        MemoryRegion(0x800, 0x1000).open()
    with pytest.raises(ConfigError, match="backing"):
        MemoryRegion(0, 0x1000, backing="tmpfs").open()


def test_memfd_backing_is_shareable(tmp_path):
    import mmap
    import os
    with GuestMemory.create(1 << 20) as mem:
        region = mem.regions[0]
        assert region.fd >= 0
        other = mmap.mmap(os.dup(region.fd), 1 << 20)
        mem.write(0x42, b"shared")
        assert other[0x42:0x48] == b"shared"
        other.close()


def test_anonymous_backing_has_no_fd():
    with GuestMemory.create(1 << 20, backing="anonymous") as mem:
        assert mem.regions[0].fd == -1
        mem.write(0, b"x")
        assert mem.read(0, 1) == b"x"


def test_hugepages_without_reservation_explain_themselves():
    try:
        with open("/proc/sys/vm/nr_hugepages") as f:
            reserved = int(f.read())
    except OSError:
        reserved = 0
    if reserved:
        pytest.skip("huge pages are reserved on this host; the failure path cannot be shown")
    with pytest.raises(ConfigError, match="huge pages"):
        GuestMemory.create(2 << 20, hugepages=True)
