"""Images of a corpus by id, and the project's one image-encoding loop (evaluation, candidate bank, gallery index,
positive scaling and the synthetic recipe's warm-up all encode images through `encode_images`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .image_files import IMAGE_EXTENSIONS, open_image
from .storage import file_stamp, sha256


class UnknownImageError(KeyError):
    """An image id that no corpus of an [`ImageStore`] holds (a `KeyError` whose message names it)."""

    def __str__(self) -> str:
        return str(self.args[0])


class ImageStore:
    """Images of a corpus (HF dataset with `image_id`, `image`) by id; ids missing from it are a clear error.

    Several corpora can be stacked (annotated + generated data); the first one holding an id wins.
    """

    def __init__(self, *corpora):
        self._corpora = [c for c in corpora if c is not None]
        self._where: dict[str, tuple[int, int]] = {}
        self._undecoded: dict[int, object] = {}
        self._layouts: dict[int, tuple] = {}
        for ci, corpus in enumerate(self._corpora):
            for row, image_id in enumerate(corpus["image_id"]):
                self._where.setdefault(image_id, (ci, row))

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._where

    def __len__(self) -> int:
        return len(self._where)

    def check(self, image_ids, what: str = "images") -> None:
        missing = [i for i in dict.fromkeys(image_ids) if i not in self._where]
        if missing:
            raise ValueError(
                f"{len(missing)} {what} are not in the corpus (first: {missing[:5]}); the corpus config of the "
                "dataset must list every image its triplets use."
            )

    def _locate(self, image_id: str) -> tuple[int, int]:
        """(corpus, row) of `image_id`; an [`UnknownImageError`] naming it and the corpora searched otherwise."""
        where = self._where.get(image_id)
        if where is None:
            searched = "; ".join(_describe(c) for c in self._corpora) or "no corpus"
            raise UnknownImageError(
                f"image {image_id!r} is not in the corpus (searched {len(self._corpora)}: {searched}); the corpus "
                "config of the dataset must list every image its triplets use, or pass the corpus that holds it to "
                "ImageStore(...)."
            )
        return where

    def images(self, image_ids: Sequence[str]):
        """PIL RGB images, in the order of `image_ids`, decoded by the project's one image rule
        (`image_files.open_image`: first frame, EXIF orientation, 16-bit scaled); an image that does not decode is
        a `BadImageError` naming its id and file."""
        self.check(image_ids)
        out = []
        for image_id in image_ids:
            value = self._stored(*self._where[image_id])
            where = f" ({value['path']})" if isinstance(value, dict) and value.get("path") else ""
            out.append(open_image(value, name=f"{image_id!r}{where}"))
        return out

    def _stored(self, ci: int, row: int):
        """The stored, undecoded value of an image: `{"bytes", "path"}`."""
        import datasets

        if ci not in self._undecoded:
            self._undecoded[ci] = self._corpora[ci].cast_column("image", datasets.Image(decode=False))
        return self._undecoded[ci][row]["image"]

    def raw(self, image_id: str) -> tuple[bytes, str | None]:
        """The stored (encoded) bytes of an image and its file name, without decoding it."""
        value = self._stored(*self._locate(image_id))
        if value.get("bytes") is not None:
            return value["bytes"], value.get("path")
        with open(value["path"], "rb") as f:
            return f.read(), value["path"]

    def raw_bytes(self, image_id: str) -> bytes:
        """The stored (encoded) bytes of an image, for content fingerprints without decoding."""
        return self.raw(image_id)[0]

    def digests(self, image_ids: Sequence[str]) -> list[str]:
        """sha256 (hex) of each image's stored bytes: its content identity (caption cache, bank, evaluator)."""
        return [sha256(self.raw_bytes(i)) for i in image_ids]

    def stamps(self, image_ids: Sequence[str]) -> list[str | None]:
        """A cheap identity of each image's stored bytes, from file metadata only (no image byte is read): for an
        image file, its path, size, mtime, ctime and inode; for bytes embedded in a dataset's Arrow files, those
        files' metadata and the row. Any rewrite changes it (ctime and inode cannot be set back, unlike mtime),
        so a content hash cached under it is valid while it is unchanged (`modeling_spn4cir.storage.file_stamp`).
        None where there is no file (an in-memory dataset): hash the bytes instead."""
        stat_cache: dict[str, str | None] = {}

        def stat(path: str) -> str | None:
            if path not in stat_cache:
                try:
                    stat_cache[path] = file_stamp(path)
                except OSError:
                    stat_cache[path] = None
            return stat_cache[path]

        out = []
        for image_id in image_ids:
            ci, row = self._locate(image_id)
            paths, embedded, rows, files = self._layout(ci)
            if paths is None:
                out.append(None)
                continue
            row = rows[row] if rows is not None else row
            if embedded[row]:
                file_stamps = [stat(f) for f in files]
                out.append(None if not files or None in file_stamps else f"arrow:{'|'.join(file_stamps)}#{row}")
            else:
                path_stamp = stat(paths[row]) if paths[row] else None
                out.append(None if path_stamp is None else f"file:{path_stamp}")
        return out

    def _layout(self, ci: int):
        """(paths, embedded?, indices mapping, arrow files) of corpus `ci`'s image column, read from Arrow
        metadata (the bytes are not touched)."""
        if ci not in self._layouts:
            corpus = self._corpora[ci]
            try:
                paths, embedded = [], []
                for chunk in corpus.data.column("image").chunks:
                    paths += chunk.field("path").to_pylist()
                    embedded += [not null for null in chunk.field("bytes").is_null().to_pylist()]
                indices = corpus._indices
                rows = indices.column(0).to_pylist() if indices is not None else None
                files = [f["filename"] for f in corpus.cache_files]
                self._layouts[ci] = (paths, embedded, rows, files)
            except (AttributeError, KeyError, TypeError, ValueError):  # not an Image column of (bytes, path)
                self._layouts[ci] = (None, None, None, None)
        return self._layouts[ci]


def _describe(corpus) -> str:
    """A corpus in an error message: its rows, and the file or split it was loaded from where known."""
    files = [f["filename"] for f in getattr(corpus, "cache_files", None) or []]
    split = getattr(corpus, "split", None)
    origin = f" from {files[0]}" + (f" (+{len(files) - 1} files)" if len(files) > 1 else "") if files else ""
    rows = f"{len(corpus)} row{'s' if len(corpus) != 1 else ''}"
    return f"{rows}{f' of split {split}' if split else ''}{origin}"


class _ProcessedImages(torch.utils.data.Dataset):
    """`image_ids[i]` -> its `pixel_values` `[3, S, S]`; decoding and preprocessing run in DataLoader workers."""

    def __init__(self, images: ImageStore, image_ids: Sequence[str], image_processor):
        self.images, self.image_ids, self.image_processor = images, list(image_ids), image_processor

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = self.images.images([self.image_ids[i]])
        return self.image_processor(image, return_tensors="pt")["pixel_values"][0]


def encode_images(
    encode: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]],
    images: ImageStore,
    image_ids: Sequence[str],
    image_processor,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = torch.float32,
    desc: str = "images",
    show_progress_bar: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """
    Encode `image_ids` in batches without gradient, keeping the results on the CPU.

    Args:
        encode: `pixel_values [B, 3, S, S] -> tensor [B, ...]` or a tuple of such tensors, e.g. a CIR model's
            `get_target_embeds_and_reference_features` or `get_target_embeds`.
        images: where the images are ([`ImageStore`]); unknown ids are an error naming them.
        image_processor: PIL images -> `pixel_values`.
        num_workers: DataLoader workers that decode and preprocess images in parallel.
        device: where `encode` runs (default: the CPU).
        dtype: storage dtype of the results (None keeps `encode`'s).

    Returns:
        `[M, ...]` (or a tuple of them, as `encode` returns), rows in the order of `image_ids`.
    """
    image_ids = list(image_ids)
    if not image_ids:
        raise ValueError(f"No images to encode for the {desc}.")
    images.check(image_ids, desc)
    loader = torch.utils.data.DataLoader(_ProcessedImages(images, image_ids, image_processor),
                                         batch_size=batch_size, num_workers=num_workers)
    outputs: list[tuple[torch.Tensor, ...]] = []
    single = False
    for pixels in tqdm(loader, desc=f"Encoding {desc}", disable=not show_progress_bar):
        with torch.no_grad():
            out = encode(pixels.to(device) if device is not None else pixels)
        single = isinstance(out, torch.Tensor)
        out = (out,) if single else tuple(out)
        outputs.append(tuple(o.detach().to("cpu", dtype=dtype or o.dtype) for o in out))
    stacked = tuple(torch.cat(parts) for parts in zip(*outputs))
    return stacked[0] if single else stacked


__all__ = ["IMAGE_EXTENSIONS", "ImageStore", "UnknownImageError", "encode_images"]  # IMAGE_EXTENSIONS: image_files
