"""Heat maps as inline PNG images, written with zlib alone (no plotting library, nothing fetched)."""

from __future__ import annotations

import base64
import struct
import zlib

import numpy as np


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def heat_map_png(values: np.ndarray, cell: int = 4) -> bytes:
    """A [rows, cols] array of values in [0, 1] as an RGB PNG, each value a `cell`-pixel square, white (0) to
    dark blue (1). Values are clipped to [0, 1]."""
    shade = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0) ** 0.5  # square root: small weights stay visible
    white, blue = np.array([255, 255, 255], np.float32), np.array([8, 48, 107], np.float32)
    rgb = (white + (blue - white) * shade[..., None]).astype(np.uint8)
    rgb = rgb.repeat(cell, axis=0).repeat(cell, axis=1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rgb)  # filter type 0 on every scanline
    header = struct.pack(">IIBBBBB", rgb.shape[1], rgb.shape[0], 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 9)) + \
        _chunk(b"IEND", b"")


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()
