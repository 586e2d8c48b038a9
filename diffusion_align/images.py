"""Pixels as every reader should see them: 8-bit RGB, whatever the file stored."""

from __future__ import annotations

import numpy as np
import PIL.Image

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit grey PNG / TIFF open as one of these


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """8-bit RGB. PIL's own `convert("RGB")` clips 16-bit grey pixels (0..65535) and float pixels to 0..255, which
    turns nearly every 16-bit image white: those are scaled instead (16-bit and 32-bit integer grey from 0..65535,
    float grey from 0..1 when it stays within it, else clipped to 0..255). 16-bit RGB PNGs already open as 8-bit
    RGB. Alpha is dropped, as OpenAI's CLIP, open_clip and the CLIP processors of PickScore's time did (transformers'
    processors now composite it onto white); a palette image goes through RGBA so its transparency is read."""
    if image.mode in _SIXTEEN_BIT:
        grey = np.asarray(image).astype(np.float64) / 257.0
    elif image.mode == "F":
        grey = np.asarray(image).astype(np.float64)
        grey = grey * 255.0 if np.nanmax(grey, initial=0.0) <= 1.0 else grey
    elif image.mode == "P":
        return image.convert("RGBA").convert("RGB")
    else:
        return image.convert("RGB")
    grey = np.nan_to_num(grey, nan=0.0)
    rgb = PIL.Image.fromarray(np.clip(grey, 0, 255).round().astype(np.uint8), "L").convert("RGB")
    rgb.info.update(image.info)  # its EXIF too, as convert() keeps it: the orientation the grid shows it in
    return rgb
