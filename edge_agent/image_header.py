"""Image dimensions read from the header, before any pixel is decoded.

A 333-byte JPEG can declare 16000x16000 pixels: decoding it costs gigabytes. Whoever decodes bytes from
outside (ingest, retraining, a directory source) asks :func:`check_image_size` first. Pure logic: bytes
in, (width, height) out; JPEG (every SOF marker) and PNG (IHDR) are read, other formats are left to
the decoder's own limits.
"""

from __future__ import annotations

import struct

MAX_IMAGE_PIXELS = 40_000_000
"""Largest image decoded from outside input (a 40 MP camera frame); about 120 MB as BGR."""

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


class ImageHeaderError(ValueError):
    """The bytes are not an image this module can size, or declare an image too large to decode."""


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's first start-of-frame segment; ImageHeaderError if there is none."""
    if data[:2] != b"\xff\xd8":
        raise ImageHeaderError("not a JPEG (no SOI marker)")
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise ImageHeaderError(f"JPEG marker expected at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if length < 2:
            raise ImageHeaderError(f"JPEG segment at byte {i} has length {length}")
        if marker in _SOF_MARKERS:
            if i + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        if marker in (0xD9, 0xDA):  # end of image, or scan data before any frame header
            break
        i += 2 + length
    raise ImageHeaderError("JPEG has no frame header (SOF)")


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    if data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR" or len(data) < 24:
        raise ImageHeaderError("not a PNG with an IHDR chunk")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG or PNG from its header; None for other formats."""
    if data[:2] == b"\xff\xd8":
        return jpeg_size(data)
    if data[:8] == _PNG_SIGNATURE:
        return png_size(data)
    return None


def check_image_size(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int] | None:
    """The header's (width, height), refusing empty or oversized images before they are decoded."""
    size = image_size(data)
    if size is None:
        return None
    width, height = size
    if width < 1 or height < 1:
        raise ImageHeaderError(f"image header declares {width}x{height} pixels")
    if width * height > max_pixels:
        raise ImageHeaderError(
            f"image header declares {width}x{height} pixels, more than the {max_pixels:,} decoded here"
        )
    return size
