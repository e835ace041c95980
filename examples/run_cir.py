"""Train and/or evaluate a CIR model with SPN's two stages.

    accelerate launch examples/run_cir.py                      # no dataset: the built-in SPN recipe (synthetic)
    accelerate launch examples/run_cir.py \\
        --model_name_or_path openai/clip-vit-base-patch32 --dataset fashioniq --data_dir fashionIQ_dataset \\
        --stage in_batch --do_train --do_eval --output_dir out/stage1
    accelerate launch examples/run_cir.py \\
        --model_name_or_path out/stage1 --dataset fashioniq --data_dir fashionIQ_dataset \\
        --extra_triplets <generated triplets dir or Hub id> --stage candidate_bank --do_train --do_eval \\
        --learning_rate 2e-5 --per_device_train_batch_size 256 --num_train_epochs 3 --output_dir out/stage2
    python examples/run_cir.py config.json                    # the same arguments from a JSON or YAML file
    python examples/run_cir.py examples/configs/clip4cir_fiq_stage2.json --data_dir D --model_name_or_path M
                                                              # a paper config; later flags override its values

Two modes:
- with `--dataset` (and `--model_name_or_path`): train (`--stage in_batch` = SPN stage 1, `--stage candidate_bank` =
  stage 2) and/or evaluate on a real benchmark or your own data, with every `transformers.TrainingArguments` option
  plus SPN's (listed below). Writes `all_results.json` (train and eval metrics, with the evaluation protocol) into
  `--output_dir`.
- without `--dataset`: the built-in SPN recipe (stage 0 warm-up, a generative captioner trained on separate data,
  stage 1, positive scaling, stage 2, the ablation table with a zero-shot row) on a procedurally generated
  benchmark, on a CPU (README: the embedded default, for its time); its options are listed at the end.
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from transformers import HfArgumentParser

from datasets_scripts.common import TRIPLET_FEATURES
from datasets_scripts.dedup import dedup_map_for
from datasets_scripts.load import load_cir_data, load_extra_corpora
from modeling_spn4cir.families import FAMILIES, base_families_help
from modeling_spn4cir.image_store import ImageStore
from modeling_spn4cir.loading import load_cir_model_and_processor
from modeling_spn4cir.storage import atomic_write_json
from trainers.bank_extras import ExtraImages
from trainers.candidate_bank import bank_image_ids
from trainers.cir_trainer import CIRTrainer, CIRTrainingArguments
from trainers.evaluation import PROTOCOLS, CIREvaluator, get_protocol
from trainers.lora import merge_lora

TRIPLET_COLUMNS = list(TRIPLET_FEATURES)  # the schema's core columns, shared by every source
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "a CIR checkpoint of any family, or a base checkpoint to start stage 1 from (CLIP, BLIP, BLIP-2)"})
    model_type: str | None = field(default=None, metadata={
        "help": f"family to build on a base checkpoint, by its model_type ({base_families_help()})",
        "choices": list(FAMILIES)})
    fusion: str = field(default="sum", metadata={"help": "sum or combiner (when wrapping a CLIP)"})
    bidirectional: bool = field(default=False, metadata={
        "help": "BLIP4CIR stage 1: add Bi-BLIP4CIR's reversed-query objective (+Bi, weight 0.4)"})
    preprocessing: str = field(default="targetpad", metadata={"help": "targetpad, squarepad or resize"})


@dataclass
class DataArguments:
    dataset: str | None = field(default=None, metadata={"help": "fashioniq, cirr, circo, or a dataset dir/Hub id"})
    data_dir: str | None = field(default=None, metadata={"help": "the benchmark's official layout (or converted)"})
    extra_triplets: str | None = field(default=None, metadata={"help": "generated triplets to add (SPN's --plus)"})
    train_split: str = "train"
    eval_split: str = "val"
    protocol: str | None = field(default=None, metadata={
        "help": f"evaluation protocol, one of {', '.join(PROTOCOLS)} (default: the dataset's own; recall for "
                "other data). fashioniq_remove_reference is SPN4CIR's CLIP4CIR FashionIQ protocol; the CIRCO "
                "authors' code keeps the reference (circo); CIRR and recall always remove it"})
    dedup: bool = field(default=True, metadata={
        "help": "stage 2: map identical training images to one id so the bank holds each picture once (the "
                "original's optimized_images.json); pixel hashes cached in dedup_hashes.<split>/ next to the "
                "converted dataset. --no_dedup turns it off"})
    dedup_map: str | None = field(default=None, metadata={"help": "JSON {duplicate id: canonical id} to use instead"})
    max_train_samples: int | None = None
    submission_dir: str | None = field(default=None, metadata={"help": "where test-server files go (test splits)"})
    bank_extra_images: list[str] | None = field(default=None, metadata={
        "help": "stage 2: one or more DATASET[:SPLIT] whose images in no training triplet are appended to the "
                "candidate bank as negatives only (the original's train_negplus.py): the training dataset's name "
                "(its SPLIT, default --train_split: FashionIQ / CIRR hold every image of the split file) or a corpus "
                "in the project schema (dir or Hub id; e.g. CIRR's train split plus a corpus of COCO images made "
                "with datasets_scripts.images, as the original adds to CIRR); stored beside the bank in --bank_dir"})
    bank_extra_limit: int | None = field(default=None, metadata={
        "help": "take at most this many extra negatives (the first in corpus order)"})
    report_queries: int = field(default=0, metadata={
        "help": "write a retrieval report of this many eval queries (HTML + PNG contact sheet) into "
                "OUTPUT_DIR/retrieval_report after each evaluation"})


def build_parser() -> HfArgumentParser:
    """The training arguments; `--help` also shows the no-dataset recipe's options."""
    import argparse

    from spn_recipe import recipe_parser

    recipe_options = recipe_parser().format_help().split("options:", 1)[-1]
    return HfArgumentParser(
        (ModelArguments, DataArguments, CIRTrainingArguments), description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=paper_configs_help() + "\noptions of the built-in recipe (no --dataset):" + recipe_options,
    )


def paper_configs_help() -> str:
    """One line per ready config in examples/configs/ (README: the table of values and their sources)."""
    lines = ["paper configs (examples/configs/; `run_cir.py CONFIG.json [--flag value ...]`, flags override; set "
             "--data_dir, --model_name_or_path and --extra_triplets to your paths):"]
    for path in sorted(CONFIGS_DIR.glob("*.json")):
        c = json.loads(path.read_text())
        lines.append(f"  {path.name:28s} {c['stage']}, batch {c['per_device_train_batch_size']}, "
                     f"{c['num_train_epochs']} epochs, lr {c['learning_rate']:g}, tau {c['temperature']:g}")
    return "\n".join(lines) + "\n"


def _parse_config_file(parser, path: str, overrides: list[str]):
    """A JSON / YAML config as the defaults, then `overrides` (command-line flags) on top."""
    text = Path(path).read_text()
    if path.endswith(".json"):
        config = json.loads(text)
    else:
        import yaml

        config = yaml.safe_load(text)
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; `python examples/run_cir.py --help` lists the arguments.")
    parser.set_defaults(**config)
    return parser.parse_args_into_dataclasses(overrides)


def parse_args(argv):
    parser = build_parser()
    if argv and argv[0].endswith(CONFIG_SUFFIXES):
        parsed = _parse_config_file(parser, argv[0], argv[1:])
    else:
        if not any(a.startswith("--output_dir") for a in argv):
            argv = [*argv, "--output_dir", "outputs/run_cir"]
        parsed = parser.parse_args_into_dataclasses(argv)
    if parsed[1].protocol is not None:
        get_protocol(parsed[1].protocol)  # an unknown name fails here, naming the choices, not after loading
    return parsed


def stage2_dedup_map(data_args, data, args, train, corpora) -> dict[str, str] | None:
    """`--dedup_map`'s mapping, or for stage 2 the training images' copies (pixel hashes cached beside the data)."""
    if data_args.dedup_map:
        return json.loads(Path(data_args.dedup_map).read_text())
    if train is None or args.stage != "candidate_bank" or not data_args.dedup:
        return None
    local = data.path and Path(data.path).is_dir()
    cache = (Path(data.path) if local else Path(args.output_dir)) / f"dedup_hashes.{data_args.train_split}"
    dedup_map = dedup_map_for(ImageStore(*corpora), bank_image_ids([train]), cache,
                              show_progress_bar=not args.disable_tqdm)
    print(f"de-duplication: {len(dedup_map)} training images are copies of another ({cache})")
    return dedup_map


def bank_summary(bank) -> dict:
    """What `all_results.json` records of a stage-2 bank: its rows, and how many are extra negatives."""
    extra = bank.extra
    return {"bank_size": bank.size, "bank_extra_negatives": len(extra.image_ids) if extra else 0,
            **({"bank_extra_dropped": extra.dropped} if extra else {})}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    config_file = bool(argv) and argv[0].endswith(CONFIG_SUFFIXES)
    if any(a in ("-h", "--help") for a in argv):
        build_parser().print_help()
        return None
    if not config_file and not any(a == "--dataset" or a.startswith("--dataset=") for a in argv):
        # No dataset: the built-in SPN recipe on the synthetic benchmark (see spn_recipe/recipe.py).
        from spn_recipe import main as recipe_main

        return recipe_main(argv)
    model_args, data_args, args = parse_args(argv)
    if data_args.dataset is None or model_args.model_name_or_path is None:
        raise SystemExit("Pass --dataset and --model_name_or_path (or no arguments for the built-in recipe).")
    model, processor = load_cir_model_and_processor(
        model_args.model_name_or_path, model_args.fusion, model_args.preprocessing, args.temperature,
        model_type=model_args.model_type, bidirectional=model_args.bidirectional,
    )
    data = load_cir_data(data_args.dataset, data_args.data_dir, protocol=data_args.protocol)

    train, corpora = None, [data.corpus[data_args.train_split]] if data_args.train_split in data.corpus else []
    if args.do_train:
        train = data.triplets[data_args.train_split].select_columns(TRIPLET_COLUMNS)
        if data_args.extra_triplets:
            extra = datasets.load_dataset(data_args.extra_triplets, "triplets", split="train")
            train = datasets.concatenate_datasets([train, extra.select_columns(TRIPLET_COLUMNS).cast(train.features)])
            corpora.append(datasets.load_dataset(data_args.extra_triplets, "corpus", split="train"))
        if data_args.max_train_samples:
            train = train.select(range(min(data_args.max_train_samples, len(train))))
    dedup_map = stage2_dedup_map(data_args, data, args, train, corpora)
    extra_negatives = None
    if data_args.bank_extra_images and args.do_train:
        extras, ids, source = load_extra_corpora(data_args.bank_extra_images, data, data_args.train_split)
        extra_negatives = ExtraImages(ImageStore(*extras), ids, source, data_args.bank_extra_limit)
    evaluator = None
    if args.do_eval or args.eval_strategy != "no":
        evaluator = CIREvaluator(
            data.corpus[data_args.eval_split], data.triplets[data_args.eval_split], processor.image_processor,
            processor, protocol=data.protocol,
            batch_size=args.per_device_eval_batch_size, submission_dir=data_args.submission_dir,
            show_progress_bar=not args.disable_tqdm,
            report_dir=str(Path(args.output_dir) / "retrieval_report") if data_args.report_queries > 0 else None,
            report_queries=data_args.report_queries,
        )
    trainer = CIRTrainer(
        model, args, train_dataset=train, corpus=corpora, processor=processor, evaluator=evaluator,
        join_annotated_captions=data.join_annotated_captions, dedup_map=dedup_map, extra_negatives=extra_negatives,
        model_card_info={"base_model": model_args.model_name_or_path,
                         "datasets": data_args.dataset + (f" + {data_args.extra_triplets}" if data_args.extra_triplets else "")},
    )
    results = {}
    if args.do_train:
        output = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
        trainer.save_model()
        results |= {f"train_{k}" if not k.startswith("train_") else k: v for k, v in output.metrics.items()}
        if trainer.bank is not None:
            results |= bank_summary(trainer.bank)
    if args.do_eval:
        results |= trainer.evaluate()
    if evaluator is not None:
        results["eval_protocol"] = evaluator.protocol_description
    if trainer.is_world_process_zero():
        if args.do_train and args.merge_lora:
            results["merged_checkpoint"] = str(merge_lora(args.output_dir, Path(args.output_dir) / "merged"))
        atomic_write_json(Path(args.output_dir) / "all_results.json", results, indent=2)
        print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
