"""`build_zoo`: a local copy of the SPN authors' release -> `models/`, `datasets/`, `dedup_maps/` and
`conversion_report.json`, every model converted by its family's converter (and evaluated when its benchmark is
given)."""

from __future__ import annotations

from pathlib import Path

from datasets_scripts.load import load_cir_data
from datasets_scripts.paper_triplets import (
    convert_extend_file,
    guess_dedup_dataset,
    read_dedup_map,
)
from modeling_spn4cir.families import family
from modeling_spn4cir.storage import (
    OutputDirError,
    atomic_write_bytes,
    atomic_write_json,
    directory_lock,
)

from ..evaluation import CIREvaluator
from .cards import model_card, release_license
from .paper import (
    SOURCE_REPO,
    default_tokenizers,
    reported_protocol,
    stage2_temperature,
)
from .release import Entry, Release, ZooModel, ZooReport, classify_release


def benchmark_dirs(data_dir=None, fashioniq_dir=None, cirr_dir=None) -> tuple[Path | None, Path | None]:
    """The FashionIQ and CIRR directories: explicit ones, else `data_dir/fashionIQ_dataset` and
    `data_dir/cirr_dataset` (SPN4CIR's layout) where they exist."""
    found = []
    for explicit, folder in ((fashioniq_dir, "fashionIQ_dataset"), (cirr_dir, "cirr_dataset")):
        if explicit is None and data_dir is not None and (Path(data_dir) / folder).is_dir():
            explicit = Path(data_dir) / folder
        found.append(Path(explicit) if explicit is not None else None)
    if data_dir is not None and found == [None, None]:
        raise FileNotFoundError(f"--data_dir {data_dir} has neither fashionIQ_dataset/ nor cirr_dataset/ (SPN4CIR's "
                                "layout); pass --fashioniq_dir / --cirr_dir instead.")
    return found[0], found[1]


def _benchmarks(fashioniq_dir, cirr_dir) -> dict:
    out = {}
    for dataset, directory in (("fashioniq", fashioniq_dir), ("cirr", cirr_dir)):
        if directory is not None:
            out[dataset] = load_cir_data(dataset, str(directory))
    return out


def _train_ids(data) -> list[str]:
    if "train" not in data.corpus:
        raise ValueError(f"The {data.name} benchmark at {data.path} has no train split; the generated triplets and "
                         "dedup maps are checked against (and take their images from) the train corpus.")
    return data.corpus["train"]["image_id"]


def build_zoo(snapshot_dir: str | Path, output_dir: str | Path, fashioniq_dir: str | Path | None = None,
              cirr_dir: str | Path | None = None, tokenizers: dict[str, str | None] | None = None,
              namespace: str | None = None, eval_batch_size: int = 64, overwrite: bool = False) -> ZooReport:
    """Convert everything recognizable under `snapshot_dir` into `output_dir` (`models/`, `datasets/`, `dedup_maps/`,
    `conversion_report.json`).

    Args:
        fashioniq_dir, cirr_dir: the benchmarks (official layout or converted): needed for the generated-triplet
            datasets (ids checked, images copied) and to evaluate the models; without one, its extend files are
            listed as not converted and its models carry reported metrics only.
        tokenizers: family -> tokenizer to save with the processor (default: each family's `default_tokenizer`;
            None: image processor only).
        namespace: Hub namespace the cards name for the stage-1 base of stage-2 models.
        overwrite: replace the outputs of a previous run (a directory holding anything else is never replaced).
    """
    snapshot_dir, output_dir = Path(snapshot_dir), Path(output_dir)
    if not snapshot_dir.is_dir():
        raise FileNotFoundError(f"{snapshot_dir} is not a directory; pass a snapshot of {SOURCE_REPO}.")
    out, source = output_dir.resolve(), snapshot_dir.resolve()
    if out == source or source in out.parents:
        raise OutputDirError(
            f"--output_dir {output_dir} is or is inside the release copy {snapshot_dir} (--local_dir): "
            "the zoo would be written among the release's files, and a later run would convert its own outputs as "
            "release files. Choose an output directory outside the release copy.")
    with directory_lock(output_dir, "model zoo"):  # a second zoo build into it fails, naming this one
        return _build(snapshot_dir, output_dir, benchmarks=_benchmarks(fashioniq_dir, cirr_dir),
                      tokenizers={**default_tokenizers(), **(tokenizers or {})}, namespace=namespace,
                      eval_batch_size=eval_batch_size, overwrite=overwrite)


def _build(snapshot_dir: Path, output_dir: Path, benchmarks: dict, tokenizers: dict, namespace: str | None,
           eval_batch_size: int, overwrite: bool) -> ZooReport:
    release = classify_release(snapshot_dir, output_dir)
    license = release_license(snapshot_dir)
    for model in _convert_models(release, tokenizers, benchmarks, eval_batch_size, overwrite):
        card = model_card(model, model.conversion_card, model.measured, namespace, license)
        atomic_write_bytes(model.directory / "README.md", card.encode())
    maps = _write_dedup_maps(release.dedups, benchmarks, output_dir)
    _write_datasets(release.extends, benchmarks, maps, output_dir, overwrite)
    atomic_write_json(output_dir / "conversion_report.json", release.report.to_json(), indent=2)
    return release.report


def _convert_models(release: Release, tokenizers: dict, benchmarks: dict, eval_batch_size: int,
                    overwrite: bool) -> list[ZooModel]:
    """Every named checkpoint (`release.name_models`: copies are reported, not converted), converted; one whose
    conversion fails is reported, the others still convert."""
    return [model for candidates in release.models.values() for model in candidates
            if model.directory is not None and model.entry.kind == "model"
            and _convert(model, tokenizers, benchmarks, eval_batch_size, overwrite)]


def _convert(model: ZooModel, tokenizers: dict, benchmarks: dict, eval_batch_size: int, overwrite: bool) -> bool:
    """Convert (and evaluate) one model; a checkpoint the converter rejects is reported, the others still convert."""
    converter = family(model.family).converter_module()
    try:
        out = converter.convert_original_checkpoint(model.source_path, model.directory,
                                                    tokenizer=tokenizers.get(model.family),
                                                    overwrite_output_dir=overwrite,
                                                    **stage2_temperature(model.family, model.dataset))
    except OutputDirError:
        raise
    except (ValueError, KeyError) as error:  # CheckpointMismatchError and unreadable geometry name the keys
        model.entry.kind, model.entry.outputs = "not_converted", []
        model.entry.reason = f"recognized as {model.family} stage {model.stage}, but the conversion failed: {error}"
        return False
    model.conversion_card = (out / "README.md").read_text()
    if model.dataset in benchmarks and "val" not in benchmarks[model.dataset].triplets:
        model.entry.details["measured"] = f"not measured: the {model.dataset} benchmark has no val split"
    elif model.dataset in benchmarks:
        model.measured = _evaluate(out, model, benchmarks[model.dataset], eval_batch_size)
        model.entry.details["measured"] = model.measured
    return True


def _evaluate(model_dir: Path, zoo_model: ZooModel, data, batch_size: int) -> dict:
    from modeling_spn4cir.loading import load_cir_model_and_processor

    model, processor = load_cir_model_and_processor(str(model_dir))
    protocol = reported_protocol(zoo_model.family, zoo_model.dataset, zoo_model.stage)
    evaluator = CIREvaluator(data.corpus["val"], data.triplets["val"], processor.image_processor, processor,
                             protocol=protocol, batch_size=batch_size, show_progress_bar=False)
    return evaluator(model)


def _write_dedup_maps(dedups: list[tuple[Entry, Path]], benchmarks: dict, output_dir: Path) -> dict:
    """`optimized_images.json` -> `dedup_maps/<benchmark>.json`; returns benchmark -> map."""
    maps = {}
    for entry, path in dedups:
        dataset = guess_dedup_dataset(path)
        if dataset is None:
            entry.kind, entry.reason = "not_converted", "cannot tell whether it is FashionIQ's or CIRR's (folder name)"
            continue
        ids = _train_ids(benchmarks[dataset]) if dataset in benchmarks else None
        maps[dataset] = read_dedup_map(path, ids)
        out = atomic_write_json(output_dir / "dedup_maps" / f"{dataset}.json", maps[dataset], indent=1)
        entry.kind, entry.outputs = "dedup_map", [out.relative_to(output_dir).as_posix()]
        entry.details = {"dataset": dataset, "duplicates": len(maps[dataset]),
                         "checked_against_corpus": ids is not None}
    return maps


def _write_datasets(extends: list, benchmarks: dict, maps: dict, output_dir: Path, overwrite: bool) -> None:
    """Each extend file -> the scaled-triplets dataset(s) the original reads it as (with the benchmark's dedup map)."""
    for entry, extend in extends:
        if extend.dataset not in benchmarks:
            entry.kind = "not_converted"
            entry.reason = (f"the {extend.dataset} benchmark is needed (its train images fill the dataset's corpus): "
                            f"pass --{'fashioniq' if extend.dataset == 'fashioniq' else 'cirr'}_dir or --data_dir")
            continue
        corpus = benchmarks[extend.dataset].corpus["train"]
        entry.kind = "dataset"
        for llm in extend.variants():
            out = convert_extend_file(extend, output_dir / "datasets" / extend.dataset_name(llm), corpus, llm,
                                      overwrite=overwrite)
            if extend.dataset in maps:
                atomic_write_json(out / "dedup_map.json", maps[extend.dataset], indent=1)
            entry.outputs.append(out.relative_to(output_dir).as_posix())
        entry.details = {"dataset": extend.dataset, "backbone": extend.backbone, "family": extend.family,
                         "llm": extend.variants()}


__all__ = ["benchmark_dirs", "build_zoo"]
