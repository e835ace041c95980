"""The images of a gallery to index: a folder, a list of image files or a corpus dataset, as one [`GalleryImages`]
(an `ImageStore` over them, their ids and files, and where they came from)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..image_store import IMAGE_EXTENSIONS, ImageStore


@dataclass
class GalleryImages:
    """`store` holds the images by id; `ids` and `paths` (the image file of each, None where it lives only inside
    a dataset) are in row order; `source` says where they came from (`{"type": "folder" | "files" | "corpus"}`)."""

    store: ImageStore
    ids: list[str]
    paths: list[str | None]
    source: dict


def _corpus_from_paths(paths: Sequence[str], ids: Sequence[str]):
    import datasets

    return datasets.Dataset.from_dict({"image_id": list(ids), "image": list(paths)},
                                      features=datasets.Features({"image_id": datasets.Value("string"),
                                                                  "image": datasets.Image()}))


def _from_corpus(corpus, ids: Sequence[str] | None, dataset: dict | None) -> GalleryImages:
    import datasets

    missing = {"image_id", "image"} - set(corpus.column_names)
    if missing:
        raise ValueError(f"The corpus has no {sorted(missing)} column; a gallery corpus has `image_id` and `image` "
                         f"(the project schema), it has {corpus.column_names}.")
    if ids is not None:
        raise ValueError("A corpus brings its own `image_id` column; do not pass ids.")
    undecoded = corpus.cast_column("image", datasets.Image(decode=False))["image"]
    paths = [v.get("path") if v.get("bytes") is None and v.get("path") and os.path.exists(v["path"]) else None
             for v in undecoded]
    return GalleryImages(ImageStore(corpus), list(corpus["image_id"]), paths, {"type": "corpus", "dataset": dataset})


def _folder_files(root: Path) -> list[Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder of images; pass a folder, a list of image files or a "
                                "corpus dataset.")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under {root}.")
    return files


def gallery_images(images, ids: Sequence[str] | None = None, dataset: dict | None = None) -> GalleryImages:
    """
    The [`GalleryImages`] of `images`.

    Args:
        images: a folder (every image under it, ids = paths relative to it), a list of image files (ids = the
            paths as given), or a `datasets.Dataset` corpus with `image_id` and `image`.
        ids: one id per image of a folder or a file list, instead of the default ones.
        dataset: for a corpus, how to load it again (`{"path", "name", "split"}` for `datasets.load_dataset`).
    """
    import datasets

    if isinstance(images, datasets.Dataset):
        return _from_corpus(images, ids, dataset)
    if isinstance(images, (str, os.PathLike)):
        root = Path(images)
        files = _folder_files(root)
        ids = ids if ids is not None else [p.relative_to(root).as_posix() for p in files]
        source = {"type": "folder", "root": str(root.resolve())}
    else:
        files = [Path(p) for p in images]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} image files do not exist (first: {missing[:5]}).")
        ids = ids if ids is not None else [str(p) for p in files]
        source = {"type": "files"}
    ids = list(ids)
    if len(ids) != len(files):
        raise ValueError(f"{len(ids)} ids for {len(files)} images; pass one id per image.")
    paths = [str(p.resolve()) for p in files]
    return GalleryImages(ImageStore(_corpus_from_paths(paths, ids)), ids, list(paths), source)


__all__ = ["GalleryImages", "gallery_images"]
