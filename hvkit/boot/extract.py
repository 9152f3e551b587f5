"""Pull the ELF vmlinux out of a bzImage.

A bzImage carries its kernel compressed (``payload_offset`` and
``payload_length`` in the setup header, protocol 2.08+). Decompressing it in
the VMM lets the kernel boot through PVH without running the in-guest
decompressor, which matters where guest kernel code is emulated: there the
decompressor alone takes tens of seconds.

Formats: gzip, xz, lzma, bzip2 (Python's standard library), lz4 (the
kernel's "legacy" lz4 framing; PyPI ``lz4``) and zstd (PyPI
``zstandard``). lzo is refused with a clear error.
"""
from __future__ import annotations

import bz2
import lzma
import struct
import zlib

from hvkit.boot.bzimage import parse_setup_header
from hvkit.errors import GuestLoadError

LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
LZ4_LEGACY_BLOCK_MAX = 8 << 20       # uncompressed size of every full block
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XZ_MAGIC = b"\xfd7zXZ\x00"
GZIP_MAGIC = b"\x1f\x8b"
BZIP2_MAGIC = b"BZh"
LZO_MAGIC = b"\x89LZO"
LZMA_MAGIC = b"\x5d\x00\x00"

MAX_VMLINUX = 1 << 30                # refuse to inflate beyond this (a zip bomb)


def payload(data: bytes, name: str = "bzImage") -> bytes:
    """The compressed kernel inside a bzImage."""
    hdr = parse_setup_header(data, name)
    if hdr.version < 0x0208 or not hdr.payload_length:
        raise GuestLoadError(f"{name}: boot protocol {hdr.version_str} has no payload fields "
                             f"(payload_offset/payload_length need 2.08+)")
    start = hdr.setup_size + hdr.payload_offset
    end = start + hdr.payload_length
    if end > len(data):
        raise GuestLoadError(f"{name}: payload [{start:#x}, {end:#x}) runs past the end of "
                             f"the file ({len(data):#x} bytes); truncated image?")
    return data[start:end]


def compression_of(blob: bytes) -> str:
    """The compression format by its magic bytes."""
    if blob.startswith(GZIP_MAGIC):
        return "gzip"
    if blob.startswith(XZ_MAGIC):
        return "xz"
    if blob.startswith(LZ4_LEGACY_MAGIC):
        return "lz4"
    if blob.startswith(ZSTD_MAGIC):
        return "zstd"
    if blob.startswith(BZIP2_MAGIC):
        return "bzip2"
    if blob.startswith(LZO_MAGIC):
        return "lzo"
    if blob.startswith(LZMA_MAGIC):
        return "lzma"
    if blob.startswith(b"\x7fELF"):
        return "none"
    return "unknown"


def decompress(blob: bytes, name: str = "payload") -> bytes:
    """Decompress a kernel payload whatever its format; trailing bytes after
    the compressed stream (the kernel appends the size) are ignored."""
    kind = compression_of(blob)
    try:
        if kind == "none":
            return blob
        if kind == "gzip":
            d = zlib.decompressobj(wbits=31)
            out = d.decompress(blob, MAX_VMLINUX)
            if not d.eof:
                raise GuestLoadError(f"{name}: gzip stream is truncated")
            return out
        if kind in ("xz", "lzma"):
            d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ if kind == "xz" else lzma.FORMAT_ALONE)
            out = d.decompress(blob, MAX_VMLINUX)
            if kind == "xz" and not d.eof:
                raise GuestLoadError(f"{name}: xz stream is truncated")
            return out
        if kind == "bzip2":
            d = bz2.BZ2Decompressor()
            out = d.decompress(blob, MAX_VMLINUX)
            if not d.eof:
                raise GuestLoadError(f"{name}: bzip2 stream is truncated")
            return out
        if kind == "lz4":
            return _lz4_legacy(blob, name)
        if kind == "zstd":
            return _zstd(blob, name)
    except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError) as exc:
        if isinstance(exc, GuestLoadError):
            raise
        raise GuestLoadError(f"{name}: corrupt {kind} data: {exc}") from None
    if kind == "lzo":
        raise GuestLoadError(f"{name}: lzo-compressed kernels are not supported; rebuild "
                             f"with CONFIG_KERNEL_GZIP/XZ/LZ4/ZSTD or boot the bzImage")
    raise GuestLoadError(f"{name}: unknown compression (first bytes {blob[:6].hex()})")


def _lz4_legacy(blob: bytes, name: str) -> bytes:
    """The lz4 legacy format: magic, then blocks of [u32 compressed size]
    [lz4 block], each inflating to 8 MiB except the last."""
    try:
        import lz4.block
    except ImportError:
        raise GuestLoadError(f"{name}: lz4-compressed kernel; install the 'lz4' Python "
                             f"package to extract it") from None
    out = bytearray()
    pos = len(LZ4_LEGACY_MAGIC)
    while pos + 4 <= len(blob):
        size, = struct.unpack_from("<I", blob, pos)
        if blob[pos:pos + 4] == LZ4_LEGACY_MAGIC:      # a concatenated stream
            pos += 4
            continue
        pos += 4
        if size == 0 or pos + size > len(blob):
            break                                      # the appended size, or padding
        try:
            out += lz4.block.decompress(blob[pos:pos + size],
                                        uncompressed_size=LZ4_LEGACY_BLOCK_MAX)
        except lz4.block.LZ4BlockError as exc:
            raise GuestLoadError(f"{name}: corrupt lz4 block at {pos:#x}: {exc}") from None
        pos += size
        if len(out) > MAX_VMLINUX:
            raise GuestLoadError(f"{name}: lz4 data inflates beyond {MAX_VMLINUX} bytes")
    if not out:
        raise GuestLoadError(f"{name}: lz4 stream has no blocks")
    return bytes(out)


def _zstd(blob: bytes, name: str) -> bytes:
    try:
        import zstandard
    except ImportError:
        raise GuestLoadError(f"{name}: zstd-compressed kernel; install the 'zstandard' "
                             f"Python package to extract it") from None
    d = zstandard.ZstdDecompressor().decompressobj()
    try:
        out = d.decompress(blob)
    except zstandard.ZstdError as exc:
        raise GuestLoadError(f"{name}: corrupt zstd data: {exc}") from None
    return out


def extract_vmlinux(data: bytes, name: str = "bzImage") -> bytes:
    """The ELF vmlinux inside a bzImage (possibly followed by the kernel's
    relocation table, which ELF readers ignore)."""
    blob = payload(data, name)
    out = decompress(blob, f"{name} payload")
    if out[:4] != b"\x7fELF":
        raise GuestLoadError(f"{name}: the decompressed payload is not an ELF file "
                             f"(first bytes {out[:4]!r})")
    return out
