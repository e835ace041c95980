"""Image files: the project's one rule for turning an image file (or its bytes) into the RGB picture a model encodes
and a page draws, the one check that a file is a usable image, and the one listing of a folder of images.

`open_image` is what the image store (training, evaluation, the candidate bank, the gallery index, the reports),
the pipeline, the retrieval CLI and the demo decode with, so an image is encoded as it is drawn:

- the first frame of an animated image (GIF, APNG, WebP, multi-page TIFF);
- the EXIF orientation applied (a phone photo stored sideways is encoded and drawn upright);
- 16-bit and 32-bit grayscale (PNG, TIFF) scaled to 8 bits (PIL's own `convert("RGB")` clips them: all white);
  float images in [0, 1] scaled by 255, others clipped to [0, 255];
- everything else as PIL's `convert("RGB")` (palette, CMYK, alpha dropped), as the original code does;
- a truncated or undecodable file, or one larger than PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`,
  an error beyond twice it), is a [`BadImageError`] naming the file and the fix.

`image_problem` (the converters' and index builds' check) opens the file the same way, then verifies it cheaply
(PNG `verify()`, other formats decoded, JPEG at 1/8 scale); `list_image_files` lists a folder's images as every
folder reader here does (hidden folders skipped, broken links and unreadable files counted).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

# The image files the converters and the gallery index look for (lower-case suffixes; the first five are tried
# first where an id names a file without its suffix).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".jpe", ".jfif", ".gif", ".apng", ".tif", ".tiff",
                    ".dib", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".avif", ".jp2", ".j2k")

ORIENTATION = 0x0112  # the EXIF tag
SKIP_HINT = ("Replace or remove it; an index build (`--skip_bad_images`, `skip_bad_images=True`) and the dataset "
             "converters (`--skip_bad_images`) can leave such images out, counted.")


class BadImageError(ValueError):
    """Image files that do not decode (truncated, empty, not an image, a directory, a decompression bomb); the
    message names them."""


class _NotAnImageFile(ValueError):
    """What a source is instead of an image file (its message completes "image X ...")."""


def _describe(source, name: str | None) -> str:
    if name is not None:
        return str(name)
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, dict) and source.get("path"):
        return str(source["path"])
    return "an image given as bytes"


def _readable(source):
    """What `PIL.Image.open` reads for `source`: a path, a file object, or the bytes as a file object."""
    if isinstance(source, dict):  # a `datasets.Image(decode=False)` value
        source = source["bytes"] if source.get("bytes") is not None else source.get("path")
        if source is None:
            raise _NotAnImageFile("has neither bytes nor a path")
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise _NotAnImageFile("is empty (0 bytes)")
        return io.BytesIO(bytes(source))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            raise _NotAnImageFile("is a directory, not an image file")
        if path.stat().st_size == 0:
            raise _NotAnImageFile("is empty (0 bytes)")
        return path
    return source  # a file object


def open_image_file(source):
    """`PIL.Image.open` of `source` (a path, bytes, a file object or a `{"bytes", "path"}` value), at its first
    frame; raises what PIL raises (a decompression bomb beyond PIL's limit included). Decodes nothing yet."""
    from PIL import Image

    image = Image.open(_readable(source))
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    return image


def _eight_bit(image):
    """A 16-bit / 32-bit integer or float single-channel image as an 8-bit one ("L"), scaled, not clipped."""
    import numpy as np
    from PIL import Image

    array = np.asarray(image)
    if image.mode == "F":
        finite = array[np.isfinite(array)]
        scale = 255.0 if finite.size and finite.min() >= 0 and finite.max() <= 1 else 1.0
        array = np.nan_to_num(array, nan=0.0) * scale
    else:  # "I;16*" (0..65535) and "I", which PIL uses for 16-bit data too: the 16-bit range
        array = array.astype(np.float64) / 257.0
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "L")


def to_rgb(image):
    """A decoded PIL image as the RGB picture every model and page uses (see the module docstring): EXIF orientation
    applied, high-bit-depth grayscale scaled to 8 bits, then `convert("RGB")`. Always a new image."""
    from PIL import ImageOps

    if image.getexif().get(ORIENTATION, 1) != 1:  # (exif_transpose would copy every upright image)
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _eight_bit(image)
    return image.convert("RGB")


def open_image(source, name: str | None = None):
    """The RGB picture of an image file, its bytes, a file object, a `{"bytes", "path"}` value or a PIL image
    (already decoded: normalized only), by the rules of the module docstring. A file that is not a usable image is
    a [`BadImageError`] naming `name` (default: the path) and the fix."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return to_rgb(source)
    image = None
    try:
        image = open_image_file(source)
        image.load()
        return to_rgb(image)
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, zlib/struct errors, bomb errors, ...
        raise BadImageError(f"image {_describe(source, name)} {_problem_text(error)}. {SKIP_HINT}") from error
    finally:
        if image is not None:
            image.close()


def _problem_text(error: Exception) -> str:
    from PIL import Image

    if isinstance(error, Image.DecompressionBombError):
        return (f"is larger than PIL's decompression-bomb limit ({error}); if you trust the file, raise "
                "PIL.Image.MAX_IMAGE_PIXELS")
    if isinstance(error, _NotAnImageFile):
        return str(error)
    return f"does not decode ({type(error).__name__}: {error})"


def image_problem(source) -> str | None:
    """Why `source` (an image file, its encoded bytes or a `{"bytes", "path"}` value) is not a usable image, or None.
    Opened as `open_image` opens it; PNGs are then checked with PIL's `verify()` (every chunk and its CRC: truncation
    shows, several times cheaper than decoding), other formats decoded, JPEG at 1/8 scale (the whole entropy-coded
    stream is still read, so a truncated file fails). benchmarks/bench_image_check.py measures the cost."""
    try:
        with open_image_file(source) as image:
            if image.format == "PNG":
                image.verify()
            else:
                image.draft(image.mode, (1, 1))
                image.load()
    except Exception as error:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, zlib/struct errors, ...
        return _problem_text(error)
    return None


def find_bad_images(paths: Iterable, problem: Callable[[Hashable], str | None] | None = None) -> dict:
    """`{path: problem}` for the images of `paths` that do not decode (checked in threads: PIL decodes without
    the GIL). With `problem`, `paths` are any keys (e.g. the image ids of a dataset) and `problem(key)` says why
    each one's image is not usable, or None (e.g. `image_problem` of its encoded bytes)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    unique = list(dict.fromkeys(paths if problem is not None else (Path(p) for p in paths)))
    if not unique:
        return {}
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        problems = list(tqdm(pool.map(problem or image_problem, unique), total=len(unique), desc="checking images",
                             leave=False))
    return {key: why for key, why in zip(unique, problems) if why}


def bad_images_message(bad: dict, fix: str) -> str:
    """`"N image file(s) cannot be used: <first five with their problem>. <fix>"`."""
    shown = "; ".join(f"{path} {problem}" for path, problem in list(bad.items())[:5])
    return f"{len(bad)} image file(s) cannot be used: {shown}{' ...' if len(bad) > 5 else ''}. {fix}"


# ------------------------------------------------------------------------------------------------ folders
@dataclass
class ImageFolder:
    """The images under a folder: `files` (image suffixes, sorted by their path relative to `root`; symbolic links
    kept as they are named), `unreadable` (`{path: why}`: image-named entries that are broken links, unreadable or
    not files), and what was not looked at: `hidden` (entries under or named `.*`: `.thumbnails/`, `.git/`,
    `._photo.jpg`) and `others` (files of other types)."""

    root: Path
    files: list[Path] = field(default_factory=list)
    unreadable: dict[Path, str] = field(default_factory=dict)
    hidden: int = 0
    others: int = 0

    def left_out(self) -> str:
        """What was not listed as an image, e.g. `"left out: 2 unreadable, 1 hidden, 3 non-image"` ("" if nothing)."""
        left = [f"{n} {what}" for n, what in ((len(self.unreadable), "unreadable"), (self.hidden, "hidden"),
                                              (self.others, "non-image")) if n]
        return f"left out: {', '.join(left)}" if left else ""


def _entry_problem(path: Path) -> str | None:
    if path.is_symlink() and not path.exists():
        return f"is a broken symbolic link (to {os.readlink(path)})"
    if not path.is_file():
        return "is not a regular file"
    if not os.access(path, os.R_OK):
        return "is not readable (permission denied)"
    return None


def list_image_files(root: str | os.PathLike) -> ImageFolder:
    """The [`ImageFolder`] of `root`, searched recursively (symbolic links to folders followed once)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder of images; pass a folder, a list of image files or a "
                                "corpus dataset.")
    folder, seen = ImageFolder(root), set()
    for directory, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(directory)
        if real in seen:  # a link back up the tree
            dirnames[:] = []
            continue
        seen.add(real)
        folder.hidden += sum(name.startswith(".") for name in dirnames + filenames)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = Path(directory, name)
            if name.startswith("."):
                continue
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                folder.others += 1
            elif (why := _entry_problem(path)) is not None:
                folder.unreadable[path] = why
            else:
                folder.files.append(path)
    folder.files.sort(key=lambda p: p.relative_to(root).as_posix())
    return folder


__all__ = ["IMAGE_EXTENSIONS", "BadImageError", "ImageFolder", "bad_images_message", "find_bad_images",
           "image_problem", "list_image_files", "open_image", "open_image_file", "to_rgb"]
