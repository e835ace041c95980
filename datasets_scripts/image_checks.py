"""The image checks of the converters: every image a corpus lists must exist and decode; a missing or undecodable
one is an error naming the files and the fix, or (`--skip_missing_images`, `--skip_bad_images`) leaves the corpus
with the triplets that use it, counted for the dataset card. Images are checked by the project's one image rule
(`modeling_spn4cir.image_files.image_problem`)."""

from __future__ import annotations

from pathlib import Path

from modeling_spn4cir.image_files import BadImageError, bad_images_message, find_bad_images, image_problem

from .common import SplitData


def bad_images_error(bad: dict[Path, str]) -> BadImageError:
    return BadImageError(bad_images_message(
        bad, "Replace or remove them, or pass --skip_bad_images to leave them out and drop the triplets that use them "
             "(counted in the card)."))


def drop_images(data: SplitData, gone: set[str]) -> int:
    """Remove the images `gone` from the corpus of `data` and the triplets that use them; return how many
    triplets were dropped (added to `skipped_triplets`)."""
    data.corpus = [row for row in data.corpus if row["image_id"] not in gone]
    kept = [t for t in data.triplets if not (_triplet_images(t) & gone)]
    dropped = len(data.triplets) - len(kept)
    data.skipped_triplets += dropped
    data.triplets = kept
    return dropped


def check_images(
    splits: dict[str, SplitData], skip_missing_images: bool, where: str, image_key=lambda t: (),
    skip_bad_images: bool = False,
) -> dict[str, SplitData]:
    """Make sure every image the corpus lists exists and decodes. Without `skip_missing_images` a missing
    image is an error naming how many and the first ones; with it, the images leave the corpus and the
    triplets that use them are dropped, counted in `SplitData.skipped_triplets` / `missing_images`. Images
    that do not decode (or are directories) are an error naming the files, or with `skip_bad_images` leave
    the same way, counted in `SplitData.bad_images`."""
    missing_all = {}
    for split, data in splits.items():
        missing = [row["image_id"] for row in data.corpus if row["path"] is None or not Path(row["path"]).exists()]
        if missing:
            missing_all[split] = list(dict.fromkeys(missing))
    if missing_all and not skip_missing_images:
        total = sum(len(v) for v in missing_all.values())
        first = [f"{s}:{i}" for s, ids in missing_all.items() for i in ids][:5]
        raise FileNotFoundError(
            f"{total} images listed in the annotations are missing under {where} (first: {first}); restore them, or "
            "pass --skip_missing_images to drop the triplets that use them (the counts go into the dataset card)."
        )
    for split, missing in missing_all.items():
        data = splits[split]
        data.missing_images = missing
        dropped = drop_images(data, set(missing))
        print(f"[{split}] {len(missing)} images missing: dropped {dropped} triplets ({len(data.triplets)} kept).")
    bad = find_bad_images(row["path"] for data in splits.values() for row in data.corpus)
    if bad and not skip_bad_images:
        raise bad_images_error(bad)
    for split, data in splits.items():
        ids = list(dict.fromkeys(row["image_id"] for row in data.corpus if Path(row["path"]) in bad))
        if ids:
            data.bad_images = ids
            dropped = drop_images(data, set(ids))
            print(f"[{split}] {len(ids)} images do not decode, left out (--skip_bad_images): dropped {dropped} "
                  f"triplets ({len(data.triplets)} kept); images: {ids[:20]}{' ...' if len(ids) > 20 else ''}")
    return splits


def _triplet_images(triplet: dict) -> set[str]:
    ids = {triplet["reference_id"]}
    if triplet.get("target_id"):
        ids.add(triplet["target_id"])
    ids.update(triplet.get("target_ids") or ())
    ids.update(triplet.get("group_members") or ())
    return ids


__all__ = ["BadImageError", "bad_images_error", "check_images", "drop_images", "find_bad_images", "image_problem"]
