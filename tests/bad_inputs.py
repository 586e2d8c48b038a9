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


def enormous_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims width x height (10 gigapixels): a decompression bomb if anyone believed it."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def noisy(size: int = 48, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


# name -> bytes; BROKEN cannot be decoded (every reader skips them and says why), the rest are awkward but fine
BROKEN = ("undecodable.png", "truncated.png", "zero-byte.png", "enormous.png")


def corpus() -> dict[str, bytes]:
    whole = encoded(noisy(), "PNG")
    return {
        "undecodable.png": b"this is not an image, whatever its name says\n" * 8,
        "truncated.png": whole[:len(whole) // 2],
        "zero-byte.png": b"",
        "enormous.png": enormous_png(),
        "one-pixel.png": encoded(Image.new("RGB", (1, 1), (200, 40, 40)), "PNG"),
        "grey.png": encoded(noisy(seed=1).convert("L"), "PNG"),
        "rgba.png": encoded(noisy(seed=2).convert("RGBA"), "PNG"),
        "cmyk.jpg": encoded(noisy(seed=3).convert("CMYK"), "JPEG"),
        **sixteen_bit_images(),
        "ünïcode name ☃ with spaces.png": encoded(noisy(seed=4), "PNG"),
    }


def write_corpus(folder, prompt: str = "a red circle on a white background"):
    """The corpus as an image folder with a metadata.jsonl naming each file's prompt and seed, plus a line that
    points outside the folder."""
    import json
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for seed, (name, data) in enumerate(corpus().items()):
        (folder / name).write_bytes(data)
        lines.append(json.dumps({"file_name": name, "prompt": prompt, "seed": seed}, ensure_ascii=False))
    lines.append(json.dumps({"file_name": "../outside.png", "prompt": prompt, "seed": 99}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder
