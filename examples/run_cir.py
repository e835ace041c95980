"""Train and/or evaluate a CIR model with SPN's two stages.

    accelerate launch examples/run_cir.py                      # no dataset: the built-in SPN recipe (synthetic)
    accelerate launch examples/run_cir.py \\
        --model_name_or_path openai/clip-vit-base-patch32 --dataset fashioniq --data_dir fashionIQ_dataset \\
        --stage in_batch --do_train --do_eval --output_dir out/stage1
    accelerate launch examples/run_cir.py \\
        --model_name_or_path out/stage1 --dataset fashioniq --data_dir fashionIQ_dataset \\
        --extra_triplets <generated triplets dir or Hub id> --stage candidate_bank --do_train --do_eval \\
        --learning_rate 2e-5 --per_device_train_batch_size 256 --num_train_epochs 3 --output_dir out/stage2
    accelerate launch examples/run_cir.py examples/configs/zeroshot_fiq_stage1.json \\
        --train_dataset <generated triplets> --data_dir fashionIQ_dataset     # zero-shot: generated triplets only
    python examples/run_cir.py --model_name_or_path out/stage2 --do_eval \\
        --eval_datasets fashioniq_remove_reference=fashionIQ_dataset cirr=CIRR circo=CIRCO   # three benchmarks
    python examples/run_cir.py config.json                    # the same arguments from a JSON or YAML file
    python examples/run_cir.py examples/configs/clip4cir_fiq_stage2.json --data_dir D --model_name_or_path M
                                                              # a paper config; later flags override its values

Two modes:
- with `--dataset` (and `--model_name_or_path`): train (`--stage in_batch` = SPN stage 1, `--stage candidate_bank` =
  stage 2) and/or evaluate on a real benchmark or your own data, with every `transformers.TrainingArguments` option
  plus SPN's (listed below). `--train_dataset` trains on other triplets only (generated ones: zero-shot),
  `--eval_datasets` evaluates on several benchmarks at once. Writes `all_results.json` (train and eval metrics, the
  evaluation protocols, the training data and its size) into `--output_dir`.
- without `--dataset`: the built-in SPN recipe (stage 0 warm-up, a generative captioner trained on separate data,
  stage 1, positive scaling, stage 2, the ablation table with a zero-shot row) on a procedurally generated
  benchmark, on a CPU (README: the embedded default, for its time); its options are listed at the end.
"""

import argparse
import json
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import datasets
from transformers import HfArgumentParser, TrainingArguments

from datasets_scripts.common import TRIPLET_FEATURES
from datasets_scripts.dedup import dedup_map_for
from datasets_scripts.load import cache_root, load_cir_data, load_extra_corpora, load_training_triplets
from modeling_spn4cir.cli import DEBUG_FLAG, run_cli
from modeling_spn4cir.families import FAMILIES, base_families_help
from modeling_spn4cir.image_store import ImageStore
from modeling_spn4cir.loading import load_cir_model_and_processor
from modeling_spn4cir.storage import (
    atomic_write_json,
    directory_lock,
    sha256,
    writable_dir,
)
from trainers.bank_extras import ExtraImages
from trainers.candidate_bank import bank_image_ids
from trainers.cir_trainer import CIRTrainer, CIRTrainingArguments
from trainers.data import check_training_triplets
from trainers.evaluation import (
    PROTOCOLS,
    CIREvaluator,
    SequentialEvaluator,
    get_protocol,
    parse_eval_datasets,
)
from trainers.lora import LoRAArguments, merge_lora
from trainers.model_card import dataset_label, run_info
from trainers.zoo.cards import zero_shot_section

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
    license: str | None = field(default=None, metadata={
        "help": "the trained weights' license for the model card (a Hub license id, e.g. mit); unset: 'unknown' (the "
                "base model's and the data's terms apply)"})


@dataclass
class DataArguments:
    dataset: str | None = field(default=None, metadata={
        "help": "fashioniq, cirr, circo, or a dataset dir/Hub id: trained on (its --train_split triplets, unless "
                "--train_dataset) and evaluated on (its --eval_split, unless --eval_datasets)"})
    data_dir: str | None = field(default=None, metadata={"help": "the benchmark's official layout (or converted)"})
    extra_triplets: str | None = field(default=None, metadata={"help": "generated triplets to add (SPN's --plus)"})
    train_dataset: list[str] | None = field(default=None, metadata={
        "help": "train on the --train_split triplets of these datasets only (dirs or Hub ids in the project schema, "
                "e.g. generate_triplets.py outputs; their images from their own corpora), not on --dataset's: "
                "SPN's zero-shot setting, both stages"})
    eval_datasets: list[str] | None = field(default=None, metadata={
        "help": "evaluate on several datasets in one run, NAME=PATH each: NAME fashioniq, cirr or circo (PATH its "
                "official layout or converted dir; its own protocol), a protocol name (e.g. "
                "fashioniq_remove_reference=PATH, circo_shared_concept=PATH: that protocol), or a label of your own "
                "(PATH a project-schema dataset, recall). Metrics are eval_<NAME>_<metric>; checkpoints are chosen by "
                "--metric_for_best_model (e.g. fashioniq_average; default: the first entry's headline)"})
    train_split: str = field(default="train", metadata={"help": "the split whose triplets are trained on"})
    eval_split: str = field(default="val", metadata={
        "help": "the split evaluated (a split without targets, e.g. CIRR's test1, writes the test-server files into "
                "--submission_dir)"})
    protocol: str | None = field(default=None, metadata={
        "help": f"evaluation protocol, one of {', '.join(PROTOCOLS)} (default: the dataset's own; recall for "
                "other data). fashioniq_remove_reference is SPN4CIR's CLIP4CIR FashionIQ protocol; the CIRCO "
                "authors' code keeps the reference (circo); CIRR and recall always remove it"})
    dedup: bool = field(default=True, metadata={
        "help": "stage 2: map identical training images to one id so the bank holds each picture once (the "
                "original's optimized_images.json); pixel hashes cached in dedup_hashes.<split>/ next to the "
                "converted dataset. --no_dedup turns it off"})
    dedup_map: str | None = field(default=None, metadata={"help": "JSON {duplicate id: canonical id} to use instead"})
    max_train_samples: int | None = field(default=None, metadata={"help": "train on the first N triplets only"})
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


USAGE = "run_cir.py [CONFIG.json|CONFIG.yaml] [--option value ...]   (no --dataset: the built-in SPN recipe)"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every option's default (an unset one, None, goes unsaid)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> HfArgumentParser:
    """The training arguments; `--help` lists SPN's options first (stage, candidate bank, negatives; LoRA; model;
    data) with their defaults and the ready configs, then `transformers.TrainingArguments`, then the no-dataset
    recipe's options."""
    from spn_recipe import recipe_parser

    recipe_options = recipe_parser().format_help().split("options:", 1)[-1]
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, CIRTrainingArguments), usage=USAGE, formatter_class=_HelpFormatter,
        description=__doc__ + "\n" + paper_configs_help() + f"\n{DEBUG_FLAG} (without a value): on an error, show its "
                    "traceback (default: one message naming the fix).",
        epilog="options of the built-in recipe (no --dataset):" + recipe_options,
    )
    return _group_options(parser)


def _group_options(parser: HfArgumentParser) -> HfArgumentParser:
    """Move each option into the group of its dataclass, SPN's groups before the Trainer's many options."""
    trainer_fields = {f.name for f in fields(TrainingArguments)}
    lora_fields = {f.name for f in fields(LoRAArguments)}
    spn_fields = [f.name for f in fields(CIRTrainingArguments) if f.name not in trainer_fields | lora_fields]
    groups = [
        ("SPN training: stage, candidate bank, negatives (trainers.cir_trainer.CIRTrainingArguments)", spn_fields),
        ("LoRA on the query side (trainers.lora.LoRAArguments; needs peft)", [f.name for f in fields(LoRAArguments)]),
        ("model", [f.name for f in fields(ModelArguments)]),
        ("data", [f.name for f in fields(DataArguments)]),
        ("transformers.TrainingArguments (the Trainer's own options)", sorted(trainer_fields)),
    ]
    options = parser._optionals  # argparse keeps the help layout in its (private, stable) action groups
    for title, names in groups:
        group = parser.add_argument_group(title)
        moved = [action for action in options._group_actions if action.dest in set(names)]
        for action in moved:
            options._group_actions.remove(action)
            group._group_actions.append(action)
    return parser


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


def check_sources(model_args, data_args, args) -> None:
    """What trains and what is evaluated must be named, and every named source used, before anything loads."""
    if model_args.model_name_or_path is None:
        raise SystemExit("Pass --model_name_or_path (or no arguments for the built-in recipe).")
    evaluating = args.do_eval or args.eval_strategy != "no"
    if args.do_train and not (data_args.dataset or data_args.train_dataset):
        raise SystemExit("--do_train needs training triplets: pass --dataset (its train split) or --train_dataset.")
    if evaluating and not (data_args.dataset or data_args.eval_datasets):
        raise SystemExit("Evaluation needs a benchmark: pass --dataset (with --data_dir) or --eval_datasets NAME=PATH.")
    if not (args.do_train or evaluating):
        raise ValueError("Nothing to do: pass --do_train (train --stage in_batch or candidate_bank), --do_eval (evaluate "
                         f"the model on --eval_split {data_args.eval_split}), or both.")
    if data_args.dataset and data_args.eval_datasets and (data_args.train_dataset or not args.do_train):
        raise SystemExit(f"--dataset {data_args.dataset} would be used for nothing: --eval_datasets names the "
                         "evaluation and --train_dataset (or no --do_train) the training. Drop it, or list it in "
                         "--eval_datasets.")
    if data_args.eval_datasets and not evaluating:
        raise SystemExit("--eval_datasets needs --do_eval (or an --eval_strategy) to evaluate anything.")
    if data_args.eval_datasets and data_args.protocol:
        raise SystemExit(f"--protocol {data_args.protocol} applies to --dataset's evaluation; with --eval_datasets "
                         f"name the protocol in the entry instead ({data_args.protocol}=PATH).")


def training_data(data_args, data, args) -> tuple:
    """`(triplets, corpora, sources)` to train on: --train_dataset's triplets only, or --dataset's train split,
    plus --extra_triplets; `(None, corpora, [])` without --do_train (the corpora then serve --bank_extra_images)."""
    split = data_args.train_split
    if data_args.train_dataset:
        loaded = load_training_triplets(data_args.train_dataset, split, TRIPLET_COLUMNS)
        train, corpora, sources = loaded.triplets, list(loaded.corpora), list(loaded.sources)
    else:
        corpora = [data.corpus[split]] if data is not None and split in data.corpus else []
        train, sources = None, [data_args.dataset] if data is not None else []
        if args.do_train:
            train = data.triplets[split].select_columns(TRIPLET_COLUMNS)
    if not args.do_train:
        return None, corpora, []
    if data_args.extra_triplets:
        extra = datasets.load_dataset(data_args.extra_triplets, "triplets", split="train")
        train = datasets.concatenate_datasets([train, extra.select_columns(TRIPLET_COLUMNS).cast(train.features)])
        corpora.append(datasets.load_dataset(data_args.extra_triplets, "corpus", split="train"))
        sources.append(data_args.extra_triplets)
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    check_training_triplets(train, ImageStore(*corpora), f"the training data of {' + '.join(sources)}")
    return train, corpora, sources



def dedup_cache_dir(data, data_args, args) -> Path:
    """Where stage 2's pixel hashes are cached: beside a local converted dataset (`dedup_hashes.<split>/`), else (a
    Hub dataset, or a dataset on read-only storage) under the cache root (`SPN4CIR_CACHE`), else `--output_dir`."""
    name = f"dedup_hashes.{data_args.train_split}"
    local = not data_args.train_dataset and data is not None and data.path and Path(data.path).is_dir()
    if local and writable_dir(Path(data.path) / name):
        return Path(data.path) / name
    if not local:
        return Path(args.output_dir) / name
    fallback = cache_root() / f"dedup_hashes-{sha256(str(Path(data.path).resolve()).encode())[:16]}.{data_args.train_split}"
    if not writable_dir(fallback):
        raise PermissionError(
            f"Stage 2's de-duplication caches pixel hashes in {Path(data.path) / name}, but {data.path} is not "
            f"writable, and neither is the cache directory {fallback} (SPN4CIR_CACHE). Set SPN4CIR_CACHE to a "
            "writable directory, pass --dedup_map FILE (python -m datasets_scripts.dedup), or pass --no_dedup.")
    print(f"{data.path} is not writable: the de-duplication hashes are cached in {fallback}")
    return fallback


def stage2_dedup_map(data_args, data, args, train, corpora) -> dict[str, str] | None:
    """`--dedup_map`'s mapping, or for stage 2 the training images' copies (pixel hashes cached, `dedup_cache_dir`)."""
    if data_args.dedup_map:
        return json.loads(Path(data_args.dedup_map).read_text())
    if train is None or args.stage != "candidate_bank" or not data_args.dedup:
        return None
    cache = dedup_cache_dir(data, data_args, args)
    dedup_map = dedup_map_for(ImageStore(*corpora), bank_image_ids([train]), cache,
                              show_progress_bar=not args.disable_tqdm)
    print(f"de-duplication: {len(dedup_map)} training images are copies of another ({cache})")
    return dedup_map


def build_evaluator(data_args, data, processor, args, entries, model_name: str):
    """--dataset's evaluator, or a `SequentialEvaluator` over the --eval_datasets entries (None: no evaluation).
    `model_name`: what the retrieval report's title calls the evaluated model."""
    if not (args.do_eval or args.eval_strategy != "no"):
        return None
    split = data_args.eval_split
    report = Path(args.output_dir) / "retrieval_report"

    def evaluator(corpus, triplets, protocol, name="", report_dir=report):
        # a bad row named now, not after the training that precedes the first evaluation
        check_training_triplets(triplets, ImageStore(corpus), f"the evaluation split {split!r}"
                                + (f" of {name}" if name else ""), targets=False)
        return CIREvaluator(corpus, triplets, processor.image_processor, processor, protocol=protocol, name=name,
                            batch_size=args.per_device_eval_batch_size, submission_dir=data_args.submission_dir,
                            show_progress_bar=not args.disable_tqdm, report_queries=data_args.report_queries,
                            report_dir=str(report_dir) if data_args.report_queries > 0 else None,
                            split=f"{name or data_args.dataset} {split}", model_name=model_name)

    if entries is None:
        return evaluator(data.corpus[split], data.triplets[split], data.protocol)
    loaded = [(entry, entry.load(split)) for entry in entries]
    metric = args.metric_for_best_model
    return SequentialEvaluator(
        [evaluator(d.corpus[split], d.triplets[split], entry.protocol, entry.name, report / entry.name)
         for entry, d in loaded],
        primary_metric=None if metric in (None, "loss", "eval_loss") else metric)


def bank_summary(bank) -> dict:
    """What `all_results.json` records of a stage-2 bank: its rows, and how many are extra negatives."""
    extra = bank.extra
    return {"bank_size": bank.size, "bank_extra_negatives": len(extra.image_ids) if extra else 0,
            **({"bank_extra_dropped": extra.dropped} if extra else {})}


def check_data_args(data_args, args, data) -> None:
    """The splits and sizes asked for exist, before anything is loaded or built."""
    if data_args.max_train_samples is not None and data_args.max_train_samples < 1:
        raise ValueError(f"--max_train_samples must be a positive number of triplets, got "
                         f"{data_args.max_train_samples}; leave it out to train on the whole split.")
    needs = [(data_args.train_split, "--train_split", "training (--do_train)")] if args.do_train else []
    if args.do_eval or args.eval_strategy != "no":
        needs.append((data_args.eval_split, "--eval_split", "evaluation (--do_eval / --eval_strategy)"))
    for split, flag, what in needs if data is not None and not data_args.eval_datasets else ():
        for config, splits in (("triplets", data.triplets), ("corpus", data.corpus)):
            if split not in splits:
                raise ValueError(
                    f"{what} needs the split {split!r} ({flag}), but the {config} config of {data.path or data.name} "
                    f"has only {sorted(splits) or 'no splits'}. Pass {flag} with one of them"
                    + (", or drop --do_eval and set --eval_strategy no" if flag == "--eval_split" else "") + ".")



def card_info(model_args, data_args, train, sources) -> dict:
    """The model card's fields (`trainers.model_card.run_info`); a model trained on generated triplets only
    (zero-shot) also gets the published zero-shot rows to compare it with."""
    evaluated = data_args.dataset or (data_args.eval_datasets[0].split("=", 1)[-1] if data_args.eval_datasets else
                                      sources[0] if sources else "none")
    info = run_info(model_args.model_name_or_path, evaluated, data_args.train_split, data_args.eval_split,
                    data_args.extra_triplets, model_args.license)
    if data_args.train_dataset:  # named by folder or Hub id, never by a local path
        info["training_data"] = (" + ".join(f"`{dataset_label(s)[1]}`" for s in sources)
                                 + f" `{data_args.train_split}` triplets")
    if train is not None and len(train) and set(train["source"]) == {"generated"}:
        info["sections"] = [zero_shot_section()]
    return info


RUN_FLAGS = ("--dataset", "--train_dataset", "--eval_datasets")  # any of them: train / evaluate, not the recipe


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    config_file = bool(argv) and argv[0].endswith(CONFIG_SUFFIXES)
    if any(a in ("-h", "--help") for a in argv):
        build_parser().print_help()
        return None
    if not config_file and not any(a == f or a.startswith(f + "=") for a in argv for f in RUN_FLAGS):
        # No dataset: the built-in SPN recipe on the synthetic benchmark (see spn_recipe/recipe.py).
        from spn_recipe import main as recipe_main

        return recipe_main(argv)
    model_args, data_args, args = parse_args(argv)
    check_sources(model_args, data_args, args)
    _ = args.world_size  # sets up torch.distributed, so that one process of the run holds the lock below
    with directory_lock(args.output_dir, "training output"):  # a second run into it fails now, naming this one
        return train_and_evaluate(model_args, data_args, args)


def train_and_evaluate(model_args, data_args, args) -> dict:
    """Load the data and the model, build the trainer and its evaluator, then `run` them."""
    entries = parse_eval_datasets(data_args.eval_datasets) if data_args.eval_datasets else None
    data = (load_cir_data(data_args.dataset, data_args.data_dir, protocol=data_args.protocol)
            if data_args.dataset else None)
    check_data_args(data_args, args, data)
    model, processor = load_cir_model_and_processor(
        model_args.model_name_or_path, model_args.fusion, model_args.preprocessing, args.temperature,
        model_type=model_args.model_type, bidirectional=model_args.bidirectional,
    )
    train, corpora, sources = training_data(data_args, data, args)
    dedup_map = stage2_dedup_map(data_args, data, args, train, corpora)
    extra_negatives = None
    if data_args.bank_extra_images and args.do_train:
        owner = data or load_cir_data(data_args.train_dataset[0])
        extras, ids, source = load_extra_corpora(data_args.bank_extra_images, owner, data_args.train_split)
        extra_negatives = ExtraImages(ImageStore(*extras), ids, source, data_args.bank_extra_limit)
    model_name = (f"{args.output_dir} (trained from {model_args.model_name_or_path})" if args.do_train
                  else model_args.model_name_or_path)
    evaluator = build_evaluator(data_args, data, processor, args, entries, model_name)
    trainer = CIRTrainer(
        model, args, train_dataset=train, corpus=corpora, processor=processor, evaluator=evaluator,
        join_annotated_captions=data is not None and data.join_annotated_captions and not data_args.train_dataset,
        dedup_map=dedup_map, extra_negatives=extra_negatives,
        model_card_info=card_info(model_args, data_args, train, sources),
    )
    return run(trainer, args, evaluator, train, sources)


def run(trainer, args, evaluator, train, sources) -> dict:
    """Train and/or evaluate, then write `all_results.json` (metrics, the training data, the protocols)."""
    results = {}
    if args.do_train:
        output = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
        trainer.save_model()
        results |= {f"train_{k}" if not k.startswith("train_") else k: v for k, v in output.metrics.items()}
        results |= {"train_triplets": len(train), "train_datasets": sources}
        if trainer.bank is not None:
            results |= bank_summary(trainer.bank)
    if args.do_eval:
        results |= trainer.evaluate()
    if isinstance(evaluator, SequentialEvaluator):
        results |= {f"eval_{name}_protocol": description for name, description in evaluator.protocols.items()}
    elif evaluator is not None:
        results["eval_protocol"] = evaluator.protocol_description
    if trainer.is_world_process_zero():
        if args.do_train and args.merge_lora:
            merged = merge_lora(args.output_dir, Path(args.output_dir) / "merged", overwrite=True)
            results["merged_checkpoint"] = str(merged)
        atomic_write_json(Path(args.output_dir) / "all_results.json", results, indent=2)
        print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    run_cli(main)
