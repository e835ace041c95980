"""The images of a gallery to index: a folder, a list of image files or a corpus dataset, as one [`GalleryImages`]
(an `ImageStore` over them, their ids and files, and where they came from).

A folder is listed by the project's one folder rule (`image_files.list_image_files`: every image suffix, hidden
folders and files skipped, broken links and unreadable files counted). An image that cannot be used (a broken
link, an unreadable, truncated or undecodable file, a decompression bomb) is an error naming it, or with
`skip_bad_images` is left out and listed in the source's `bad_images`. Every source records the folder its
files lie in (`root`): an index serves (`CIRIndex.open_image`) only the files under it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..image_files import BadImageError, bad_images_message, find_bad_images, image_problem, list_image_files
from ..image_store import IMAGE_EXTENSIONS, ImageStore

DATASET_KEYS = frozenset({"path", "name", "split"})  # how a corpus source says where its images are (load_dataset)
SKIP_FIX = ("Replace or remove them, or pass --skip_bad_images (CIRIndex.build(..., skip_bad_images=True)) to leave "
            "them out (listed in the index's sources).")


@dataclass
class GalleryImages:
    """`store` holds the images by id; `ids` and `paths` (the image file of each, None where it lives only inside
    a dataset) are in row order; `source` says where they came from (`{"type": "folder" | "files" | "corpus",
    "root": the folder the files lie in, ...}`)."""

    store: ImageStore
    ids: list[str]
    paths: list[str | None]
    source: dict


def _corpus_from_paths(paths: Sequence[str], ids: Sequence[str]):
    import datasets

    return datasets.Dataset.from_dict({"image_id": list(ids), "image": list(paths)},
                                      features=datasets.Features({"image_id": datasets.Value("string"),
                                                                  "image": datasets.Image()}))


def _root_of(paths: Sequence[str | None]) -> str | None:
    """The deepest folder holding every file of `paths` (None without files)."""
    folders = [os.path.dirname(p) for p in paths if p is not None]
    return os.path.commonpath(folders) if folders else None


def _from_corpus(corpus, ids: Sequence[str] | None, dataset: dict | None) -> GalleryImages:
    import datasets

    missing = {"image_id", "image"} - set(corpus.column_names)
    if missing:
        raise ValueError(f"The corpus has no {sorted(missing)} column; a gallery corpus has `image_id` and `image` "
                         f"(the project schema), it has {corpus.column_names}.")
    if ids is not None:
        raise ValueError("A corpus brings its own `image_id` column; do not pass ids.")
    if dataset is not None and not (isinstance(dataset, dict) and set(dataset) <= DATASET_KEYS):
        raise ValueError(f"dataset={dataset!r}: say how to load the corpus again with the keys {sorted(DATASET_KEYS)} "
                         "(the arguments of datasets.load_dataset).")
    undecoded = corpus.cast_column("image", datasets.Image(decode=False))["image"]
    paths = [os.path.abspath(v["path"]) if v.get("bytes") is None and v.get("path") and os.path.exists(v["path"])
             else None for v in undecoded]
    return GalleryImages(ImageStore(corpus), list(corpus["image_id"]), paths,
                         {"type": "corpus", "dataset": dataset, "root": _root_of(paths)})


def _from_folder(root: Path, ids: Sequence[str] | None) -> tuple[GalleryImages, dict]:
    folder = list_image_files(root)
    if not folder.files and not folder.unreadable:
        raise ValueError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under {root} (searched recursively)"
                         f"{'; ' + folder.left_out() if folder.left_out() else ''}.")
    base = root.resolve()  # the files keep their names under it (a link in the gallery is served as named)
    files = [base / p.relative_to(root) for p in folder.files]
    ids = ids if ids is not None else [p.relative_to(base).as_posix() for p in files]
    source = {"type": "folder", "root": str(base)}
    source |= {key: n for key, n in (("hidden_skipped", folder.hidden), ("other_files", folder.others)) if n}
    unreadable = {p.relative_to(root).as_posix(): why for p, why in folder.unreadable.items()}
    return _gallery(files, ids, source), unreadable


def _from_files(images, ids: Sequence[str] | None) -> tuple[GalleryImages, dict]:
    files = [Path(os.path.abspath(p)) for p in images]
    ids = list(ids) if ids is not None else [str(p) for p in images]
    if len(ids) != len(files):
        raise ValueError(f"{len(ids)} ids for {len(files)} images; pass one id per image.")
    unreadable = {i: "does not exist" for i, p in zip(ids, files) if not p.is_file()}
    kept = [(i, p) for i, p in zip(ids, files) if i not in unreadable]
    gallery = _gallery([p for _, p in kept], [i for i, _ in kept], {"type": "files"})
    gallery.source["root"] = _root_of(gallery.paths)
    return gallery, unreadable


def _gallery(files: list[Path], ids: Sequence[str], source: dict) -> GalleryImages:
    ids = list(ids)
    if len(ids) != len(files):
        raise ValueError(f"{len(ids)} ids for {len(files)} images; pass one id per image.")
    paths = [str(p) for p in files]
    return GalleryImages(ImageStore(_corpus_from_paths(paths, ids)) if ids else None, ids, paths, source)


def _corpus_problem(store: ImageStore, image_id: str) -> str | None:
    try:
        return image_problem(store.raw_bytes(image_id))
    except OSError as error:  # an image stored as a path to a file that is gone
        return f"cannot be read ({type(error).__name__}: {error})"


def _leave_out_bad(gallery: GalleryImages, unreadable: dict[str, str], skip: bool) -> GalleryImages:
    """`gallery` without its unusable images (checked only with `skip`: otherwise the encoding names the first
    one), which are an error unless `skip`; the left-out ids go into `source["bad_images"]`."""
    bad = dict(unreadable)
    if skip and gallery.ids:
        position = dict(zip(gallery.ids, gallery.paths))
        if all(p is not None for p in gallery.paths):
            by_path = find_bad_images(gallery.paths)
            bad |= {i: by_path[Path(p)] for i, p in position.items() if Path(p) in by_path}
        else:
            bad |= find_bad_images(gallery.ids, lambda i: _corpus_problem(gallery.store, i))
    if bad and not skip:
        raise BadImageError(bad_images_message({f"image {i!r}": why for i, why in bad.items()}, SKIP_FIX))
    if not bad:
        return gallery
    keep = [n for n, i in enumerate(gallery.ids) if i not in bad]
    if not keep:
        raise BadImageError(bad_images_message({f"image {i!r}": why for i, why in bad.items()},
                                               "No image of the gallery can be used: check that it is a gallery."))
    gallery.source["bad_images"] = list(bad)
    gallery.ids = [gallery.ids[n] for n in keep]
    gallery.paths = [gallery.paths[n] for n in keep]
    if gallery.store is None:
        gallery.store = ImageStore(_corpus_from_paths(gallery.paths, gallery.ids))
    return gallery


def gallery_images(images, ids: Sequence[str] | None = None, dataset: dict | None = None,
                   skip_bad_images: bool = False) -> GalleryImages:
    """
    The [`GalleryImages`] of `images`.

    Args:
        images: a folder (every image under it, ids = paths relative to it), a list of image files (ids = the
            paths as given), or a `datasets.Dataset` corpus with `image_id` and `image`.
        ids: one id per image of a folder or a file list, instead of the default ones.
        dataset: for a corpus, how to load it again (`{"path", "name", "split"}` for `datasets.load_dataset`).
        skip_bad_images: leave out the images that cannot be used (each one checked first), listed in
            `source["bad_images"]`, instead of an error naming them.
    """
    import datasets

    unreadable: dict[str, str] = {}
    if isinstance(images, datasets.Dataset):
        gallery = _from_corpus(images, ids, dataset)
    elif isinstance(images, (str, os.PathLike)):
        gallery, unreadable = _from_folder(Path(images), ids)
    else:
        gallery, unreadable = _from_files(list(images), ids)
    return _leave_out_bad(gallery, unreadable, skip_bad_images)


__all__ = ["GalleryImages", "gallery_images"]
