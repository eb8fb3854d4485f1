"""Input images for the image-input and mask tests, made in code: ordinary files in each format, and the
hostile ones (decompression bombs, truncated files) crafted byte by byte so that none is ever decoded."""

from __future__ import annotations

import base64
import io
import struct
import zlib

from PIL import Image


def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def halves(size: tuple[int, int], left: tuple[int, ...], right: tuple[int, ...], mode: str = "RGB"):
    """An image whose left half is `left` and right half `right` (orientation tests can tell them apart)."""
    image = Image.new(mode, size, left)
    image.paste(Image.new(mode, (size[0] - size[0] // 2, size[1]), right), (size[0] // 2, 0))
    return image


def jpeg_with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(image, "JPEG", quality=95, exif=exif.tobytes())


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header(width: int, height: int, idat: bytes) -> bytes:
    """An 8-bit RGB PNG claiming `width` x `height`, with `idat` as its compressed pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def png_bomb_header_only(width: int = 50_000, height: int = 50_000) -> bytes:
    """A PNG whose header claims width x height RGB pixels (50,000² = 7.5 GB decoded) followed by a few
    compressed zero rows: ~100 bytes, refusable from the header alone."""
    return png_header(width, height, zlib.compress(b"\x00" * (1 + 3 * min(width, 64)) * 4, 9))


def png_zero_bomb(width: int, height: int) -> bytes:
    """A complete, valid PNG of width x height black RGB pixels: decoding it allocates 3·w·h bytes, the
    file is ~1000× smaller. Compressed row by row, so making it never holds the raw pixels."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * width)  # filter byte "None" + the row's pixels
    parts = [compressor.compress(row) for _ in range(height)]
    parts.append(compressor.flush())
    return png_header(width, height, b"".join(parts))


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header (SOF0) is rewritten to claim width x height."""
    data = bytearray(encoded(Image.new("RGB", (16, 16), (10, 20, 30)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    # SOF0: marker, length (2), precision (1), height (2), width (2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def webp_claiming(width: int, height: int) -> bytes:
    """A small real lossless WebP whose VP8L header is rewritten to claim width x height (at most 16384)."""
    data = bytearray(encoded(Image.new("RGB", (16, 16), (10, 20, 30)), "WEBP", lossless=True))
    at = data.index(b"VP8L") + 8  # chunk name and size, then the 0x2f signature byte
    assert data[at] == 0x2F
    # Then 14 bits width - 1, 14 bits height - 1, alpha and version bits (little-endian bit order).
    bits = int.from_bytes(data[at + 1 : at + 5], "little")
    bits = (bits & ~((1 << 28) - 1)) | (width - 1) | ((height - 1) << 14)
    data[at + 1 : at + 5] = bits.to_bytes(4, "little")
    return bytes(data)


def truncated_png(size: tuple[int, int] = (64, 64)) -> bytes:
    """A real PNG of noise cut in the middle of its pixel data (noise, so the data cannot be tiny)."""
    image = Image.frombytes("RGB", size, bytes((i * 7919) % 251 for i in range(size[0] * size[1] * 3)))
    data = encoded(image, "PNG")
    return data[: len(data) // 2]
