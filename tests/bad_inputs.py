"""Awkward and broken image files, made on the fly, for the tests of every reader (docs/robustness.md)."""

import io
import struct
import zlib

import numpy as np
from PIL import Image

GREY_16 = 0x8000  # the grey 16-bit test images hold: 128 in 8 bits (0x8000 / 257 = 127.5, rounded half to even)


def png_16bit(array: np.ndarray) -> bytes:
    """A 16-bit PNG (grey for (H, W), RGB for (H, W, 3)), written by hand: PIL cannot write 16-bit RGB."""
    height, width = array.shape[:2]
    colour_type = 2 if array.ndim == 3 else 0
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def sixteen_bit_images(size: int = 40) -> dict[str, bytes]:
    """Mid-grey images stored with 16 bits per channel, as PNG and TIFF, grey and RGB."""
    grey = np.full((size, size), GREY_16, dtype=np.uint16)
    return {"grey16.png": png_16bit(grey), "rgb16.png": png_16bit(np.stack([grey] * 3, axis=-1)),
            "grey16.tif": encoded(Image.fromarray(grey), "TIFF")}
