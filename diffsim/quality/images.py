"""Image folders as inputs: list the images in a folder and open them, with one-line errors naming the file.

A folder is flat: every visible file in it must be an image (hidden files such as ``.DS_Store`` are skipped,
sub-folders are not searched). A stray non-image file is an error rather than silently left out, so a count
of images is always the count of files the user put there.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import PIL.Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def list_images(folder: str | Path, *, what: str = "image folder") -> list[Path]:
    """Image files directly in ``folder``, sorted by name. Missing/empty folders and non-image files are errors."""
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"{folder}: no such {what}")
    if not folder.is_dir():
        raise InputError(f"{folder}: {what} is not a directory")
    images = []
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if path.name.startswith(".") or path.is_dir():
            continue
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise InputError(f"{path}: not an image file (expected one of {', '.join(IMAGE_EXTENSIONS)}); "
                             f"move it out of the {what}")
        images.append(path)
    if not images:
        raise InputError(f"{folder}: {what} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return images


def open_image(path: str | Path) -> "PIL.Image.Image":
    """Decode an image fully and convert it to RGB; a corrupt or truncated file is an InputError naming it."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path}: cannot decode image ({reason})") from None


def verify_images(paths: list[Path]) -> None:
    """Cheap up-front check (header and, for PNG, checksums) so a bad file fails before hours of work."""
    from PIL import Image, UnidentifiedImageError

    for path in paths:
        try:
            with Image.open(path) as im:
                im.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise InputError(f"{path}: cannot decode image ({reason})") from None


def load_images(paths: list[Path]) -> list["PIL.Image.Image"]:
    return [open_image(p) for p in paths]
