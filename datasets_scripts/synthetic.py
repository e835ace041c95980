"""A procedurally generated compositional CIR benchmark, deterministic by seed, in the project schema.

Scenes hold 1-4 objects on a 3x3 grid (positions jittered); an object has a shape (5), a colour (8) and a
size (2), and no two objects of a scene share colour and shape, so "the red circle" is unambiguous. Images
are 64x64 with mild background noise, so equal scenes never have equal pixels. A query is a reference scene
plus a modification — add, remove, recolour, reshape, resize, move — phrased in one of several paraphrases;
its target is the reference scene with exactly that change. Each val/test gallery holds the queries'
references, targets and, per query, hard distractors that differ from the target by one attribute; every
scene of a gallery is distinct, so each query has exactly one correct target.

Splits: `train` (annotated triplets; the corpus also holds an unlabeled pool for positive scaling),
`val`, `test`, and a `pretrain` corpus of images with alt-text-like captions that stands in for CLIP's
web pre-training data. The scene graph is kept in the corpus column `scene` (JSON) for analysis only.

    python -m datasets_scripts.synthetic --output_dir synthetic-cir [--seed 0] [--size default|tiny]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import datasets
import numpy as np
from PIL import Image, ImageDraw

from modeling_spn4cir.cli import add_debug_flag, run_cli

from .common import SplitData, counts_table, write_cir_dataset

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40),
    "purple": (150, 60, 200), "orange": (245, 140, 30), "cyan": (40, 210, 220), "pink": (245, 130, 190),
}
SIZES = ("small", "large")
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
MODIFICATIONS = ("add", "remove", "recolour", "reshape", "resize", "move")
IMAGE_SIZE = 64
SIZES_PRESETS = {
    # annotated train triplets, unlabeled pool, pretrain images, val / test queries, distractors per query
    "default": dict(train=2000, pool=2000, pretrain=4000, val=300, test=400, distractors=3),
    "tiny": dict(train=120, pool=120, pretrain=200, val=40, test=40, distractors=2),
}

PARAPHRASES = {
    "add": ("add a {size} {colour} {shape} at the {cell}", "put a {size} {colour} {shape} in the {cell}",
            "there should also be a {size} {colour} {shape} at the {cell}"),
    "remove": ("remove the {colour} {shape}", "take away the {colour} {shape}", "get rid of the {colour} {shape}"),
    "recolour": ("make the {colour} {shape} {new}", "the {shape} should be {new} instead of {colour}",
                 "change the {colour} {shape} to {new}"),
    "reshape": ("turn the {colour} {shape} into a {new}", "the {colour} {shape} should be a {new} instead",
                "replace the {colour} {shape} with a {colour} {new}"),
    "resize": ("make the {colour} {shape} {change}", "the {colour} {shape} should be {new}",
               "the {colour} {shape} needs to be {change}"),
    "move": ("move the {colour} {shape} to the {cell}", "put the {colour} {shape} at the {cell} instead",
             "the {colour} {shape} should be in the {cell}"),
}


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    cell: int

    def phrase(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


Scene = tuple[Obj, ...]


def scene_key(scene: Scene) -> tuple:
    return tuple(sorted((o.cell, o.shape, o.colour, o.size) for o in scene))


def _valid(scene: Scene) -> bool:
    return (0 < len(scene) <= 4 and len({o.cell for o in scene}) == len(scene)
            and len({(o.colour, o.shape) for o in scene}) == len(scene))


def random_scene(rng: random.Random) -> Scene:
    while True:
        n = rng.randint(1, 4)
        cells = rng.sample(range(9), n)
        scene = tuple(Obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES), c) for c in cells)
        if _valid(scene):
            return scene


def modify(scene: Scene, kind: str, rng: random.Random) -> tuple[Scene, str] | None:
    """The scene with exactly one `kind` change and its text, or None if `kind` does not apply."""
    empty = [c for c in range(9) if c not in {o.cell for o in scene}]
    objects = list(scene)
    template = rng.choice(PARAPHRASES[kind])
    if kind == "add":
        if len(scene) == 4 or not empty:
            return None
        new = Obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES), rng.choice(empty))
        target = scene + (new,)
        text = template.format(size=new.size, colour=new.colour, shape=new.shape, cell=CELLS[new.cell])
    else:
        if kind == "remove" and len(scene) == 1:
            return None
        i = rng.randrange(len(objects))
        o = objects[i]
        fields = dict(colour=o.colour, shape=o.shape)
        if kind == "remove":
            target = tuple(x for j, x in enumerate(objects) if j != i)
            text = template.format(**fields)
        elif kind == "recolour":
            new = rng.choice([c for c in COLOURS if c != o.colour])
            objects[i] = replace(o, colour=new)
            target, text = tuple(objects), template.format(new=new, **fields)
        elif kind == "reshape":
            new = rng.choice([s for s in SHAPES if s != o.shape])
            objects[i] = replace(o, shape=new)
            target, text = tuple(objects), template.format(new=new, **fields)
        elif kind == "resize":
            new = "large" if o.size == "small" else "small"
            objects[i] = replace(o, size=new)
            change = "bigger" if new == "large" else "smaller"
            target, text = tuple(objects), template.format(new=new, change=change, **fields)
        elif kind == "move":
            if not empty:
                return None
            cell = rng.choice(empty)
            objects[i] = replace(o, cell=cell)
            target, text = tuple(objects), template.format(cell=CELLS[cell], **fields)
        else:
            raise ValueError(f"unknown modification {kind!r}")
    return (target, text) if _valid(target) else None


def one_attribute_distractor(scene: Scene, rng: random.Random) -> Scene | None:
    """The scene with one attribute of one object changed (a hard negative for a query whose target it is)."""
    objects = list(scene)
    i = rng.randrange(len(objects))
    o = objects[i]
    attribute = rng.choice(("colour", "shape", "size", "cell"))
    if attribute == "colour":
        objects[i] = replace(o, colour=rng.choice([c for c in COLOURS if c != o.colour]))
    elif attribute == "shape":
        objects[i] = replace(o, shape=rng.choice([s for s in SHAPES if s != o.shape]))
    elif attribute == "size":
        objects[i] = replace(o, size="large" if o.size == "small" else "small")
    else:
        empty = [c for c in range(9) if c not in {x.cell for x in scene}]
        if not empty:
            return None
        objects[i] = replace(o, cell=rng.choice(empty))
    out = tuple(objects)
    return out if _valid(out) else None


def render(scene: Scene, seed: int) -> Image.Image:
    """64x64 RGB: dark noisy background, shapes centred in their grid cell with a +-2 px jitter."""
    rng = np.random.default_rng(seed)
    background = np.clip(40 + rng.normal(0, 6, (IMAGE_SIZE, IMAGE_SIZE, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    cell = IMAGE_SIZE / 3
    for o in scene:
        cx = (o.cell % 3 + 0.5) * cell + rng.integers(-2, 3)
        cy = (o.cell // 3 + 0.5) * cell + rng.integers(-2, 3)
        r = 4.5 if o.size == "small" else 9
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o.shape == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        elif o.shape == "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
        else:  # cross
            w = r / 2.5
            draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
            draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    return image


def describe(scene: Scene, rng: random.Random) -> str:
    """An alt-text-like caption (pretraining data only): the objects, in random order."""
    phrases = [f"a {o.phrase()}" for o in rng.sample(list(scene), len(scene))]
    return ", ".join(phrases[:-1]) + (" and " if len(phrases) > 1 else "") + phrases[-1]


def phrase_vocabulary() -> list[str]:
    """Every `size colour shape` phrase: the vocabulary of the recipe's retrieval captioner."""
    return [f"{s} {c} {h}" for s in SIZES for c in COLOURS for h in SHAPES]


def scene_captions(scenes: dict[str, str], corrupt: float = 0.0, seed: int = 0) -> dict[str, str]:
    """Captions written from the scene graph (`{image_id: scene JSON}`): the image's object phrases joined by
    " and ". Diagnostic only (it reads the analysis-only metadata). `corrupt` is the fraction of all phrases, drawn
    at random (seeded), replaced by a phrase that names no object of that scene, so exactly that share of phrases
    is wrong (a wrong phrase may still match an object by colour + shape)."""
    if not 0.0 <= corrupt <= 1.0:
        raise ValueError(f"corrupt must be a fraction in [0, 1], got {corrupt}.")
    truth = {i: [f"{o['size']} {o['colour']} {o['shape']}" for o in json.loads(s)] for i, s in scenes.items()}
    phrases = {i: list(p) for i, p in truth.items()}
    slots = [(i, j) for i in phrases for j in range(len(phrases[i]))]
    rng = random.Random(seed)
    vocabulary = phrase_vocabulary()
    for i, j in rng.sample(slots, round(corrupt * len(slots))):
        taken = set(truth[i]) | set(phrases[i])  # never an object of the scene, never a repeat within the caption
        phrases[i][j] = rng.choice([p for p in vocabulary if p not in taken])
    return {i: " and ".join(p) for i, p in phrases.items()}


class _Split:
    """Images (deduplicated by scene within a gallery) and triplets of one split."""

    def __init__(self, name: str, seed: int, unique: bool):
        self.name, self.unique = name, unique
        self.images: list[dict] = []
        self.triplets: list[dict] = []
        self.keys: dict[tuple, str] = {}
        self.seed = seed

    def add_image(self, scene: Scene, caption: str | None = None) -> str | None:
        key = scene_key(scene)
        if self.unique and key in self.keys:
            return None
        image_id = f"{self.name}-{len(self.images):05d}"
        buffer = io.BytesIO()
        render(scene, seed=zlib.crc32(f"{self.seed}-{image_id}".encode())).save(buffer, format="PNG")
        self.images.append({"image_id": image_id, "image_bytes": buffer.getvalue(), "image_name": f"{image_id}.png",
                            "scene": json.dumps([asdict(o) for o in scene]), "caption": caption})
        self.keys.setdefault(key, image_id)
        return image_id


def _query(rng: random.Random, split: _Split, kinds: list[str], taken: set) -> tuple | None:
    reference = random_scene(rng)
    kind = kinds[len(split.triplets) % len(kinds)]  # every modification type equally often
    result = modify(reference, kind, rng)
    if result is None:
        return None
    target, text = result
    if split.unique and (scene_key(reference) in taken or scene_key(target) in taken):
        return None
    return reference, target, text, kind


def build_split(name: str, n_queries: int, n_distractors: int, rng: random.Random, seed: int) -> _Split:
    """Queries with their images; for val/test (`n_distractors` > 0 or unique) a gallery of distinct scenes."""
    gallery = name in ("val", "test")
    split = _Split(name, seed, unique=gallery)
    while len(split.triplets) < n_queries:
        query = _query(rng, split, list(MODIFICATIONS), set(split.keys))
        if query is None:
            continue
        reference, target, text, kind = query
        distractors = []
        if gallery:
            tries = 0
            while len(distractors) < n_distractors and tries < 50:
                tries += 1
                d = one_attribute_distractor(target, rng)
                if d is not None and scene_key(d) not in split.keys and scene_key(d) not in {
                        scene_key(x) for x in distractors + [reference, target]}:
                    distractors.append(d)
            if len(distractors) < n_distractors:
                continue
        ref_id = split.add_image(reference)
        tgt_id = split.add_image(target)
        for d in distractors:
            split.add_image(d)
        split.triplets.append({"reference_id": ref_id, "target_id": tgt_id, "modification_texts": [text],
                               "source": "annotated", "modification": kind,
                               "query_id": f"{name}-q{len(split.triplets):05d}"})
    return split


def build_synthetic(output_dir: str | Path, seed: int = 0, size: str = "default", overwrite: bool = False) -> Path:
    """Write the benchmark to `output_dir` (configs `corpus` and `triplets`): a new or empty directory, or (with
    `overwrite`) a previous output of this generator."""
    sizes = SIZES_PRESETS[size]
    rng = random.Random(seed)
    splits = {}
    train = build_split("train", sizes["train"], 0, rng, seed)
    for _ in range(sizes["pool"]):  # unlabeled training images for positive scaling
        train.add_image(random_scene(rng))
    splits["train"] = train
    for name in ("val", "test"):
        splits[name] = build_split(name, sizes[name], sizes["distractors"], rng, seed)
    pretrain = _Split("pretrain", seed, unique=False)
    for _ in range(sizes["pretrain"]):
        scene = random_scene(rng)
        pretrain.add_image(scene, caption=describe(scene, rng))
    splits["pretrain"] = pretrain
    data = {name: SplitData(corpus=s.images, triplets=s.triplets) for name, s in splits.items()}
    card = f"""# Synthetic compositional CIR benchmark (spn4cir)

Generated by `datasets_scripts.synthetic` with seed {seed}, size {size!r}: scenes of 1-4 objects (5 shapes,
8 colours, 2 sizes) on a 3x3 grid; modifications {", ".join(MODIFICATIONS)}; galleries with
{sizes["distractors"]} one-attribute distractors per query and unique scenes. `pretrain` holds captioned
images standing in for web pre-training data. The `scene` column is for analysis only.

{counts_table(data)}"""
    return write_cir_dataset(
        output_dir, data,
        corpus_extra={"scene": datasets.Value("string"), "caption": datasets.Value("string")},
        triplet_extra={"modification": datasets.Value("string"), "query_id": datasets.Value("string")},
        card=card, tool="datasets_scripts.synthetic", overwrite=overwrite,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", default="default", choices=sorted(SIZES_PRESETS))
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="replace --output_dir when it holds a previous output of this generator")
    args = add_debug_flag(parser).parse_args(argv)
    print(f"wrote {build_synthetic(args.output_dir, args.seed, args.size, args.overwrite_output_dir)}")


if __name__ == "__main__":
    run_cli(main)
