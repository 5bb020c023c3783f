"""Shared by the image tests: folders of small synthetic images, written by the tests themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_noise_images(folder: Path, n: int, seed: int, lo: int, hi: int, size: int = 40) -> Path:
    """``n`` PNGs of uniform noise in [lo, hi) (bright vs dark noise makes two easy-to-tell classes)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(lo, hi, (size, size, 3)).astype(np.uint8)).save(folder / f"im{i:03d}.png")
    return folder
