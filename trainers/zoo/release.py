"""Reading a local copy of the SPN authors' release: every file classified by its content (a checkpoint one of the
registered families recognizes, an extend file, a dedup map, something else), recorded in a `ZooReport`."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from datasets_scripts.paper_triplets import SHORT_NAME, ExtendFile, parse_extend_name
from modeling_spn4cir.families import FAMILIES, family, family_of_checkpoint
from modeling_spn4cir.storage import file_sha256

KINDS = ("model", "dataset", "dedup_map", "not_converted", "unrecognized")


@dataclass
class Entry:
    """One file of the snapshot and what became of it."""

    path: str
    kind: str  # one of KINDS
    reason: str = ""
    outputs: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)


@dataclass
class ZooReport:
    entries: list[Entry] = field(default_factory=list)

    def of(self, kind: str) -> list[Entry]:
        return [e for e in self.entries if e.kind == kind]

    def to_json(self) -> dict:
        return {kind: [asdict(e) for e in self.of(kind)] for kind in KINDS}

    def table(self) -> str:
        lines = ["| file | result | output / reason |", "|---|---|---|"]
        for e in self.entries:
            lines.append(f"| {e.path} | {e.kind} | {', '.join(e.outputs) or e.reason} |")
        return "\n".join(lines)


@dataclass
class ZooModel:
    """A checkpoint of the release that becomes `directory` (`models/spn4cir-<family>-<fiq|cirr>[-stage1]`)."""

    entry: Entry
    family: str
    dataset: str
    stage: int
    source_format: str
    source_path: Path
    directory: Path | None  # set by `name_models`
    sha256: str
    backbone: str | None = None  # the image tower by its weights (the converter's `backbone()`)
    conversion_card: str = ""
    measured: dict | None = None

    @property
    def paper_backbone(self) -> bool:
        """Whether this is the backbone of the paper's checkpoints, the one its reported numbers are for."""
        paper = family(self.family).paper
        return paper is not None and self.backbone is not None and self.backbone == paper.backbone_label

    @property
    def identity(self) -> tuple:
        """What the checkpoint is by content (family, backbone, stage), and by path only its benchmark."""
        return self.family, self.backbone, self.dataset, self.stage


@dataclass
class Release:
    """The classified snapshot: the report (every file), and the files the zoo converts."""

    report: ZooReport = field(default_factory=ZooReport)
    models: dict[tuple, list[ZooModel]] = field(default_factory=dict)  # ZooModel.identity -> in path order
    extends: list[tuple[Entry, ExtendFile]] = field(default_factory=list)
    dedups: list[tuple[Entry, Path]] = field(default_factory=list)


def _looks_like_checkpoint(path: Path) -> bool:
    """A torch zip archive or a pickle (protocol 2+), whatever the file is called."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _load_keys_only(path: Path) -> dict:
    """The checkpoint dict, memory-mapped where the format allows (reading the keys of a multi-GB file is cheap)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # legacy (non-zip) files cannot be memory-mapped: the converters' reader explains failures
        from modeling_spn4cir.conversion_utils import load_checkpoint

        data = load_checkpoint(path)
    if not isinstance(data, dict):
        raise ValueError(f"holds a {type(data).__name__}, not a checkpoint dict")
    return data


def _dataset_from_path(relative: Path) -> str | None:
    for part in reversed(relative.with_suffix("").parts):
        words = set(re.split(r"[^a-z0-9]+", part.lower()))
        if words & {"fiq", "fashioniq"} or part.lower().startswith("fashioniq"):
            return "fashioniq"
        if "cirr" in words:
            return "cirr"
    return None


def _json_kind(path: Path) -> str | None:
    """What a JSON file of the release holds, by its records' keys (None: not one of the known kinds)."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    record = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else None
    if record is None:
        return None
    keys = set(record)
    if {"reference_name", "target_name", "captions"} <= keys:
        return "zero-shot CC3M triplets (their images are not part of the release); not converted"
    if {"candidate", "target", "captions"} <= keys or {"reference", "target_hard", "caption"} <= keys:
        return ("triplets in SPN's extend format, but the name does not say the backbone "
                "(cap.extend_<backbone>[_llm].train.json / cap.rc2.train.extend_<backbone>[_llm].json)")
    if {"image_id", "caption"} <= keys:
        return "image captions (LLaVA; the input of positive scaling, already inside the extend files); not converted"
    return None


def release_files(snapshot_dir: Path) -> list[Path]:
    """Every file of the snapshot except under hidden folders (`.cache/huggingface` of `snapshot_download`)."""
    return sorted(p for p in snapshot_dir.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(snapshot_dir).parts[:-1]))


def classify_release(snapshot_dir: Path, output_dir: Path) -> Release:
    """Every file of the snapshot, classified; the models get their output directory under `output_dir`."""
    release = Release()
    for path in release_files(snapshot_dir):
        relative = path.relative_to(snapshot_dir)
        entry = Entry(relative.as_posix(), "unrecognized")
        release.report.entries.append(entry)
        if path.name in (".gitattributes", "README.md", "LICENSE"):
            entry.kind, entry.reason = "not_converted", "repository metadata"
        elif parse_extend_name(path) is not None:
            release.extends.append((entry, parse_extend_name(path)))
        elif path.name == "optimized_images.json":
            release.dedups.append((entry, path))
        elif path.suffix == ".json":
            kind = _json_kind(path)
            entry.kind, entry.reason = ("not_converted", kind) if kind else ("unrecognized", "a JSON file of no "
                                                                               "known SPN4CIR format")
        elif _looks_like_checkpoint(path):
            model = _classify_checkpoint(path, relative, entry)
            if model is not None:
                release.models.setdefault(model.identity, []).append(model)
        else:
            entry.reason = "neither a checkpoint (torch zip / pickle) nor a JSON file of SPN4CIR"
    name_models(release, output_dir)
    return release


def model_id(model: ZooModel, suffix: str = "") -> str:
    """`spn4cir-<family>[-<backbone>]-<fiq|cirr>[-stage1]`: the backbone named unless it is the paper's."""
    label = model.backbone or "unknown backbone"
    backbone = "" if model.paper_backbone else "-" + re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    return f"spn4cir-{model.family}{backbone}-{SHORT_NAME[model.dataset]}{suffix}{'-stage1' if model.stage == 1 else ''}"


def name_models(release: Release, output_dir: Path) -> None:
    """Each checkpoint's model id, from its content: a byte-for-byte copy of another is reported, not converted; two
    different checkpoints of one identity (family, backbone, benchmark, stage) are both converted, each named with
    its sha256's first 8 digits; whatever the order of their paths."""
    for candidates in release.models.values():
        distinct: dict[str, ZooModel] = {}
        for model in candidates:
            first = distinct.setdefault(model.sha256, model)
            if first is not model:
                model.entry.kind = "not_converted"
                model.entry.reason = f"a byte-for-byte copy of {first.entry.path} (same sha256), which is converted"
        for model in distinct.values():
            name = model_id(model, f"-{model.sha256[:8]}" if len(distinct) > 1 else "")
            model.directory = output_dir / "models" / name
            model.entry.kind, model.entry.outputs = "model", [f"models/{name}"]


def _classify_checkpoint(path: Path, relative: Path, entry: Entry) -> ZooModel | None:
    try:
        spec = family_of_checkpoint(_load_keys_only(path))
    except Exception as error:  # anything torch cannot read as a checkpoint dict is reported with its reason
        entry.reason = f"not a readable checkpoint dict: {error}"
        return None
    if spec is None:
        entry.reason = f"a checkpoint whose keys match no supported family ({', '.join(FAMILIES)})"
        return None
    converter = spec.converter_module()
    try:
        original = converter.read_original_checkpoint(path)
    except (ValueError, KeyError) as error:  # e.g. a CLIP4Cir Combiner alone: recognized, but no model by itself
        entry.kind, entry.reason = "not_converted", f"recognized as {spec.name}, but not a model by itself: {error}"
        return None
    try:  # a tower whose geometry cannot be read has no name; its conversion then says what is wrong
        backbone = converter.backbone(original) if hasattr(converter, "backbone") else None
    except (KeyError, ValueError, IndexError):
        backbone = None
    source_format = original.source_format
    stage = 2 if source_format == "spn4cir_stage2" else 1 if source_format.endswith("_stage1") else None
    dataset = _dataset_from_path(relative)
    if stage is None:
        entry.kind = "not_converted"
        entry.reason = f"{spec.name} base weights ({source_format}), not a CIR checkpoint of the paper"
        return None
    if dataset is None:
        entry.kind = "not_converted"
        entry.reason = f"{spec.name} stage {stage}, but the path does not say FashionIQ (fiq) or CIRR (cirr)"
        return None
    sha256 = file_sha256(path)
    entry.details = {"family": spec.name, "backbone": backbone, "dataset": dataset, "stage": stage,
                     "source_format": source_format, "sha256": sha256}
    return ZooModel(entry, spec.name, dataset, stage, source_format, path, None, sha256, backbone)


__all__ = ["Entry", "Release", "ZooModel", "ZooReport", "classify_release", "model_id", "name_models",
           "release_files"]
