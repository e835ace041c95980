"""The model card of a `CIRTrainer` run, as the Hub reads it: `model-index` with the metrics of the last evaluation
(task, dataset, split, each metric with its protocol), `datasets`, `license`, the pipeline tag, `base_model` as a Hub
id (never a local path), then the stage and training settings, the evaluation in a table rounded for reading, and a
usage snippet that runs. `CIRTrainer` writes it with every save, after every evaluation and before `push_to_hub`.

`CIRTrainer(model_card_info=...)` keys (all optional; `run_info` builds them for a `run_cir.py` run):
    base_model: the Hub id the model descends from (`modeling_spn4cir.model_cards.hub_base_model`), or None;
    base: how the table names the base model (default: the Hub id, or "a model built from a config");
    datasets: Hub dataset ids of the training data; training_data: the training data in words;
    eval_dataset: `(type, name)` of the evaluated dataset for `model-index`; eval_split: the evaluated split;
    license: a Hub license id (default "unknown"); model_name: the card's name (default: the output directory's).
"""

from __future__ import annotations

import json
from pathlib import Path

from datasets_scripts.load import BENCHMARKS
from modeling_spn4cir.families import FAMILIES
from modeling_spn4cir.model_cards import (
    cir_card_data,
    eval_results,
    hub_base_model,
    hub_dataset_id,
    metrics_table,
    render_card,
    table,
    usage,
)

from .lora import lora_card_rows

STAGE_TEXT = {"in_batch": "stage 1 (in-batch InfoNCE)", "candidate_bank": "stage 2 (candidate-bank InfoNCE)"}
STAGE_NUMBER = {"in_batch": 1, "candidate_bank": 2}
BENCHMARK_NAMES = {"fashioniq": "FashionIQ", "cirr": "CIRR", "circo": "CIRCO"}  # datasets_scripts.load.BENCHMARKS


def dataset_label(dataset: str) -> tuple[str, str]:
    """`(type, name)` of a `--dataset` for `model-index` and the card: a benchmark's own name, a Hub id as it is, a
    local directory by its folder name (never its path)."""
    if dataset in BENCHMARK_NAMES:
        return dataset, BENCHMARK_NAMES[dataset]
    name = dataset if hub_dataset_id(dataset) else Path(dataset).name
    return name, name


def base_description(name_or_path: str | None) -> tuple[str | list[str] | None, str]:
    """`(base_model, how the card names it)` for a model trained from `name_or_path`."""
    base = hub_base_model(name_or_path)
    if name_or_path and not Path(name_or_path).expanduser().exists() and base:
        return base, f"`{base}`"
    if base:
        return base, f"a local checkpoint trained from `{base}`"
    return None, "a local checkpoint (not on the Hub)" if name_or_path else "a model built from a config"


def run_info(model_name_or_path: str, dataset: str, train_split: str, eval_split: str,
             extra_triplets: str | None = None, license: str | None = None) -> dict:
    """`model_card_info` of a `run_cir.py` run."""
    base, base_text = base_description(model_name_or_path)
    hub_datasets = [d for d in (dataset, extra_triplets) if d and d not in BENCHMARKS and hub_dataset_id(d)]
    name = dataset_label(dataset)[1]
    training = f"{name} `{train_split}` triplets"
    if extra_triplets:
        training += f" + the generated triplets `{dataset_label(extra_triplets)[1]}`"
    return {"base_model": base, "base": base_text, "datasets": hub_datasets or None, "training_data": training,
            "eval_dataset": dataset_label(dataset), "eval_split": eval_split, "license": license}


def _settings(trainer) -> list[tuple[str, str]]:
    """The stage and what it was trained with."""
    args, state, info = trainer.args, trainer.state, trainer.model_card_info
    loss = json.dumps(trainer.loss_fn.get_config_dict()) if trainer.loss_fn is not None else "{}"
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    batch = (f"{args.per_device_train_batch_size} per device x {args.world_size} process(es) x "
             f"{args.gradient_accumulation_steps} accumulation step(s)")
    optimizer = (f"{getattr(args.optim, 'value', args.optim)}, learning rate {args.learning_rate:g} "
                 f"({getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)}, {args.warmup_steps} warm-up "
                 f"steps), weight decay {args.weight_decay:g}")
    rows = [("base model", info.get("base") or (f"`{info['base_model']}`" if info.get("base_model")
                                                 else "a model built from a config")),
            ("training data", info.get("training_data", "not recorded")),
            ("stage", STAGE_TEXT[args.stage]), ("loss", loss),
            ("steps / epochs", f"{state.global_step} / {state.epoch or 0:.2f}"),
            ("batch", batch), ("optimizer", optimizer),
            ("temperature", f"{trainer.temperature:g}"), ("precision", precision), ("seed", str(args.seed))]
    if trainer.bank is not None:
        extra = trainer.bank.extra
        rows.append(("candidate bank", f"{trainer.bank.size} rows" + (f", {len(extra.image_ids)} of them extra "
                                                                      "negatives" if extra else "")))
    return rows + lora_card_rows(trainer.model)


def _evaluation(trainer, metrics: dict | None) -> str:
    info, evaluator = trainer.model_card_info, trainer.evaluator
    if not metrics or evaluator is None:
        return ("## Evaluation\n\nNot evaluated yet: `trainer.evaluate()` (`run_cir.py --do_eval`) writes the "
                "metrics here and into the `model-index`.")
    name = info.get("eval_dataset", ("", "the evaluation dataset"))[1]
    protocol = getattr(evaluator, "protocol", None)
    if protocol is None:  # several benchmarks, each with its own protocol, metrics prefixed by its name
        name, protocol_text = "Several benchmarks", f"protocols {evaluator.protocol_description}"
    else:
        protocol_text = f"protocol `{protocol.name}`: {evaluator.protocol_description}"
    return (f"## Evaluation\n\n{name}, split `{info.get('eval_split', 'unnamed')}`, {protocol_text}. Percent, rounded to 2 decimals here and "
            f"to 4 in the `model-index` (`all_results.json` keeps full precision).\n\n{metrics_table(metrics)}")


def model_name(trainer) -> str:
    return trainer.model_card_info.get("model_name") or Path(trainer.args.output_dir).resolve().name


def usage_id(trainer) -> str:
    """The id the usage snippet loads: the Hub repo pushed to, else the output directory's name."""
    return getattr(trainer, "hub_model_id", None) or trainer.args.hub_model_id or model_name(trainer)


def logged_evaluation(log_history: list[dict], step: int | None = None) -> dict | None:
    """The metrics of the last evaluation in a Trainer's `log_history` (the one at `step`, when given), unprefixed."""
    for log in reversed(log_history):
        metrics = {k[len("eval_"):]: v for k, v in log.items() if k.startswith("eval_") and k != "eval_epoch"}
        if metrics and (step is None or log.get("step") == step):
            return metrics
    return None


def trainer_card(trainer, metrics: dict | None) -> str:
    """The card of `trainer`'s model with `metrics` (unprefixed, percent) of its last evaluation, or None."""
    info, args = trainer.model_card_info, trainer.args
    config = getattr(trainer.model, "config", None)
    spec = FAMILIES.get(getattr(config, "model_type", None))
    title = spec.title if spec is not None else "CIR model"
    results = None
    # one protocol for model-index; several benchmarks in one run (`SequentialEvaluator`) go to the table only
    if metrics and getattr(trainer.evaluator, "protocol", None) is not None:
        dataset_type, dataset = info.get("eval_dataset", ("cir", "the evaluation dataset"))
        results = eval_results(metrics, dataset_type, dataset, info.get("eval_split", "unnamed"),
                               trainer.evaluator.protocol.name)
    tags = [t for t in (getattr(config, "model_type", None), f"stage-{STAGE_NUMBER[args.stage]}") if t]
    metadata = cir_card_data(model_name=model_name(trainer), tags=tags, base_model=info.get("base_model"),
                             datasets=info.get("datasets"), license=info.get("license") or "unknown",
                             eval_results=results)
    intro = (f"A {title} composed image retrieval model trained with `spn4cir` (SPN: Feng et al., ACM MM 2024): "
             f"{STAGE_TEXT[args.stage]} on {info.get('training_data', 'data not recorded')}.")
    return render_card(metadata, info.get("title") or model_name(trainer), intro, "## Training\n\n"
                       + table(_settings(trainer)), _evaluation(trainer, metrics), usage(usage_id(trainer)),
                       *info.get("sections", ()))


__all__ = ["BENCHMARK_NAMES", "STAGE_TEXT", "base_description", "dataset_label", "logged_evaluation", "run_info",
           "trainer_card"]
