"""The one rule by which every command opens an image file (score's and the training commands' datasets,
`--on-bad-image skip`'s first pass, `review`'s thumbnails).

- Only a regular file is opened: a FIFO, a device or a socket named by a manifest would block `open()` or
  read forever. The file is looked at with `stat` first, opened without blocking, and looked at again.
- The pixel count its header claims is checked before any pixel is decoded (`max_image_pixels`).
- Only raster formats that Pillow decodes itself: EPS, which Pillow hands to Ghostscript, is refused.
"""

from __future__ import annotations

import contextlib
import os
import stat
import warnings
from pathlib import Path

from irank.runtime.errors import UsageError

# An image whose header claims more pixels than this is refused before it is decoded (a decompression
# bomb would otherwise take all memory). PIL's own default; IRANK_MAX_IMAGE_PIXELS sets another.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
REFUSED_FORMATS = {"EPS"}  # decoded by running Ghostscript on the file


class ImageRefused(Exception):
    """An image file that is not opened or not decoded; the message says why (no path: the caller adds it)."""

    def __init__(self, reason: str, missing: bool = False):
        super().__init__(reason)
        self.reason, self.missing = reason, missing


def max_image_pixels() -> int:
    text = os.environ.get("IRANK_MAX_IMAGE_PIXELS", "")
    try:
        value = int(text) if text.strip() else DEFAULT_MAX_IMAGE_PIXELS
    except ValueError:
        value = -1
    if value < 1:
        raise UsageError(f"IRANK_MAX_IMAGE_PIXELS={text!r}: expected a whole number of pixels, 1 or more")
    return value


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | os.PathLike):
    """A binary file object for `path` when it is a regular file (following symlinks); ImageRefused otherwise.
    A special file is never opened: `stat` looks first, and the file is opened with O_NONBLOCK and looked
    at again, so one swapped in between cannot block either."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ImageRefused("no such file", missing=True) from None
    except OSError as exc:
        raise ImageRefused(f"cannot read ({exc.strerror or exc})") from None
    except ValueError:  # a NUL character, which no file name can hold
        raise ImageRefused("no such file (the path holds a NUL character)", missing=True) from None
    if not stat.S_ISREG(mode):
        raise ImageRefused(f"{_kind(mode)}, not an image file")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        handle = os.open(path, flags)
    except OSError as exc:
        raise ImageRefused(f"cannot read ({exc.strerror or exc})") from None
    mode = os.fstat(handle).st_mode
    if not stat.S_ISREG(mode):
        os.close(handle)
        raise ImageRefused(f"{_kind(mode)}, not an image file")
    return os.fdopen(handle, "rb")


def allowed_formats() -> list[str]:
    from PIL import Image

    Image.init()
    return [name for name in Image.OPEN if name not in REFUSED_FORMATS]


@contextlib.contextmanager
def open_image(path: str | os.PathLike, max_pixels: int | None = None):
    """The image at `path`, opened under irank's rule; ImageRefused with the reason when it is not a regular
    file, claims more than `max_pixels` (default: `max_image_pixels()`) pixels — when opened, or when a frame
    is decoded inside the block — or cannot be identified. Other decoding errors inside the block are the
    caller's to catch (`decode_error` words them)."""
    from PIL import Image, UnidentifiedImageError

    limit = max_image_pixels() if max_pixels is None else max_pixels
    bombs = (Image.DecompressionBombWarning, Image.DecompressionBombError)
    with open_regular(path) as handle, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        before, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limit  # Pillow's limit is module-wide: set it here only
        try:
            try:
                image = Image.open(handle, formats=allowed_formats())
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
                raise ImageRefused(decode_error(exc)) from None
            with image:
                yield image
        except bombs as exc:
            raise ImageRefused(f"refused, not decoded: {exc} (set IRANK_MAX_IMAGE_PIXELS to allow larger images)") from None
        finally:
            Image.MAX_IMAGE_PIXELS = before


def decode_error(exc: BaseException) -> str:
    return f"cannot decode ({type(exc).__name__}: {exc})"


def describe(path: Path | str, row: int | None, reason: str) -> str:
    return f"image {path}" + (f" (row {row + 1})" if row is not None else "") + f": {reason}"
