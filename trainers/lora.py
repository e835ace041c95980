"""LoRA (PEFT) for SPN's two stages: which modules get adapters, what the optimizer may hold, saving and merging.

- Stage 1 (`in_batch`): adapters on the towers that train (the model's children that hold trainable parameters).
- Stage 2 (`candidate_bank`): adapters only inside `model.query_side_modules()`, so the target side — and the
  candidate bank, built from the frozen base before the adapters exist — is never touched.

Defaults, derived from the model so that they hold for every family (CLIP4CIR, TG-CIR, BLIP4CIR, SPRC):

- `lora_target_modules`: the `nn.Linear` layers of transformer blocks (children of an `nn.ModuleList`) and of
  attention modules (e.g. the ResNet's attention pool) inside that scope — the attention and MLP projections.
- `lora_modules_to_save`: the scope's small heads, trained in full — the scope modules (stage 2: the entries of
  `query_side_modules()`; stage 1: the model's children) with no LoRA target, every parameter trainable and no
  vocabulary-sized embedding table: projections, CLIP4CIR's Combiner, TG-CIR's token learner, masks and remain map.
- Bare `nn.Parameter`s (BLIP4CIR's learnable tau, SPRC's prompt tokens, TG-CIR's local weights), layer norms and
  embeddings stay frozen, as in standard LoRA.

`CIRTrainer` applies it when `args.lora_r` is set; its output directory then holds the adapter
(`adapter_config.json`, `adapter_model.safetensors`), the processor, a model card naming the base, and
`spn4cir_lora.json` (how to rebuild the base), so `load_cir_model_and_processor(adapter_dir)` returns the trained
model; `merge_lora(adapter_dir, output_dir)` writes a plain checkpoint that `AutoModel` loads without `peft`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from modeling_spn4cir.loading import LORA_METADATA, load_cir_model_and_processor
from modeling_spn4cir.model_cards import cir_card_data, hub_base_model, render_card, with_model_id
from modeling_spn4cir.storage import (
    OutputDirError,
    apply_umask,
    atomic_directory,
    atomic_write_json,
    checkpoint_fingerprint,
)

VOCABULARY_ROWS = 1024  # an nn.Embedding this large is a token table, never a "small head"


@dataclass
class LoRAArguments:
    """LoRA options (mixed into `CIRTrainingArguments`); LoRA is off while `lora_r` is unset."""

    lora_r: int | None = field(default=None, metadata={
        "help": "LoRA rank; set it to train adapters (query side only in stage 2) instead of full fine-tuning"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    lora_target_modules: list[str] | None = field(default=None, metadata={
        "help": "module names (or name suffixes, e.g. q_proj v_proj) that get adapters, looked up only in the "
                "towers that train in this stage (stage 2: query_side_modules()); default: their attention and MLP "
                "projections"})
    lora_modules_to_save: list[str] | None = field(default=None, metadata={
        "help": "modules trained in full and saved with the adapter (e.g. combiner); default: the stage's small "
                "heads (projections, Combiner, token learners); 'none' for no such module"})
    merge_lora: bool = field(default=False, metadata={
        "help": "also write <output_dir>/merged: the adapter merged into the base, a plain checkpoint"})

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        if self.lora_r is not None and self.lora_r < 1:
            raise ValueError(f"--lora_r must be a positive rank, got {self.lora_r}.")
        if self.lora_r is None and (self.lora_target_modules or self.lora_modules_to_save or self.merge_lora):
            raise ValueError("--lora_target_modules / --lora_modules_to_save / --merge_lora need --lora_r.")


# ------------------------------------------------------------------------------------------- scope
def lora_scope(model: nn.Module, stage: str) -> dict[str, nn.Module]:
    """`{qualified name: module}` that LoRA may change in `stage`: stage 2 the query-side modules (call
    `untie_query_side()` and `freeze_target_side()` first), stage 1 the model's children that hold trainable
    parameters."""
    names = {id(m): n for n, m in model.named_modules()}
    if stage == "candidate_bank":
        return {names[id(m)]: m for m in model.query_side_modules().values() if isinstance(m, nn.Module)}
    return {n: c for n, c in model.named_children() if any(p.requires_grad for p in c.parameters())}


def _default_targets(scope: dict[str, nn.Module]) -> list[str]:
    targets = []
    for prefix, module in scope.items():
        inside_block = set()
        for name, sub in module.named_modules():
            if isinstance(sub, nn.ModuleList):
                inside_block |= {f"{name}.{child}" if name else child for child, _ in sub.named_children()}
            elif "Attention" in type(sub).__name__ and name:
                inside_block.add(name)
        for name, sub in module.named_modules():
            in_block = any(name == b or name.startswith(b + ".") for b in inside_block)
            if isinstance(sub, nn.Linear) and sub.weight.requires_grad and in_block:
                targets.append(f"{prefix}.{name}")
    return targets


def _default_modules_to_save(scope: dict[str, nn.Module], targets: list[str]) -> list[str]:
    heads = []
    for prefix, module in scope.items():
        has_target = any(t == prefix or t.startswith(prefix + ".") for t in targets)
        params = list(module.parameters())
        vocabulary = any(isinstance(m, nn.Embedding) and m.num_embeddings >= VOCABULARY_ROWS for m in module.modules())
        if not has_target and params and all(p.requires_grad for p in params) and not vocabulary:
            heads.append(prefix)
    return heads


def _resolve(requested: list[str], candidates: list[str], what: str, stage: str) -> list[str]:
    """Exact qualified names, or name suffixes (`q_proj`), looked up among `candidates` only."""
    resolved = []
    for name in requested:
        hits = [c for c in candidates if c == name or c.endswith("." + name)]
        if not hits:
            raise ValueError(f"--{what} {name!r} names no module that trains in stage {stage!r}; candidates look "
                             f"like: {', '.join(candidates[:8])}{' ...' if len(candidates) > 8 else ''}.")
        resolved += [h for h in hits if h not in resolved]
    return resolved


def lora_config_for(model: nn.Module, args: LoRAArguments, stage: str):
    """The `peft.LoraConfig` for `model` in `stage`, every module named by its full path (never by a suffix that
    could also match the target side)."""
    from peft import LoraConfig

    scope = lora_scope(model, stage)
    if args.lora_target_modules:
        linear_like = [f"{p}.{n}" if n else p for p, m in scope.items() for n, sub in m.named_modules()
                       if isinstance(sub, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding))]
        targets = _resolve(args.lora_target_modules, linear_like, "lora_target_modules", stage)
    else:
        targets = _default_targets(scope)
    if not targets:
        raise ValueError(f"No module of {type(model).__name__} gets a LoRA adapter in stage {stage!r}; name them with "
                         "--lora_target_modules.")
    if args.lora_modules_to_save is None:
        to_save = _default_modules_to_save(scope, targets)
    elif [m.lower() for m in args.lora_modules_to_save] == ["none"]:
        to_save = []
    else:
        all_modules = [f"{p}.{n}" if n else p for p, m in scope.items() for n, _ in m.named_modules()]
        to_save = _resolve(args.lora_modules_to_save, all_modules, "lora_modules_to_save", stage)
    clash = [s for s in to_save for t in targets if t == s or t.startswith(s + ".")]
    if clash:
        raise ValueError(f"{clash[0]!r} is both trained in full (--lora_modules_to_save) and given adapters; "
                         "choose one.")
    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=targets, modules_to_save=to_save or None, bias="none")


# ------------------------------------------------------------------------------------------- apply
def apply_lora(model: nn.Module, args: LoRAArguments, stage: str):
    """Wrap `model` in a `peft.PeftModel` with adapters for `stage` (in place: `model` itself gets the adapter
    layers). Stage 2 expects `untie_query_side()` and `freeze_target_side()` done, and the bank built, before this."""
    from peft import get_peft_model

    if (getattr(args, "gradient_checkpointing_kwargs", None) or {}).get("use_reentrant"):
        raise ValueError("LoRA with reentrant gradient checkpointing leaves the adapters inside checkpointed layers "
                         "without gradient; drop use_reentrant from --gradient_checkpointing_kwargs.")
    # The adapters' initial weights come from a generator seeded with the run's seed, not from whatever state the
    # global RNG is in (which depends on what ran before): the same seed gives the same adapters and results.
    base = getattr(model, "name_or_path", None)
    # what the base is by content, taken before training: the adapter is refused on anything else later
    fingerprint = checkpoint_fingerprint(base) if base else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(getattr(args, "seed", 0))
        peft_model = get_peft_model(model, lora_config_for(model, args, stage))
    peft_model.cir_lora_stage = stage
    peft_model.cir_lora_base_fingerprint = fingerprint
    # Non-reentrant checkpointing (transformers' default, enforced above) needs no gradient on the embeddings'
    # output; the hook transformers adds for it turns that output into a leaf that BLIP's in-place position-embedding
    # sum then rejects once LoRA has frozen the embeddings.
    model.enable_input_require_grads = lambda: None
    return peft_model


def is_lora_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def adapted_layers(model) -> list[str]:
    """Names of the layers that carry an adapter (peft may store `target_modules` as shortest unique suffixes)."""
    from peft.tuners.lora import LoraLayer

    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def lora_trainable_parameters(model) -> list[nn.Parameter]:
    """What LoRA training may update: the adapter matrices and the trained copies of `modules_to_save`."""
    from peft.utils.other import ModulesToSaveWrapper

    out = [p for n, p in model.named_parameters() if "lora_" in n]
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            out += list(module.modules_to_save.parameters())
    return out


def check_lora_optimizer_scope(model, stage: str) -> None:
    """Exactly the adapters (+ modules_to_save) train; in stage 2 all of them sit inside the query side."""
    allowed = {id(p) for p in lora_trainable_parameters(model)}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    extra = [n for n, p in trainable.items() if id(p) not in allowed]
    if extra:
        raise RuntimeError(f"LoRA must train only adapters and modules_to_save; also trainable: {extra[:5]}")
    if stage == "candidate_bank":
        query_side = {id(p) for p in model.get_base_model().query_side_parameters()}
        outside = [n for n, p in trainable.items() if id(p) not in query_side]
        if outside:
            raise RuntimeError(f"Stage-2 LoRA must stay on the query side; outside it: {outside[:5]}")


# ------------------------------------------------------------------------------------------- save / merge
def write_lora_metadata(peft_model, output_dir, processor=None) -> None:
    """`spn4cir_lora.json`: the base and how `load_cir_model_and_processor` rebuilds it (the family, its wrapping
    options, the stage whose preparation — `untie_query_side()`, `freeze_target_side()` — precedes the adapter, the
    trained tau)."""
    base = peft_model.get_base_model()
    config = base.config
    image_processor = getattr(processor, "image_processor", None)
    base_model = peft_model.peft_config["default"].base_model_name_or_path
    if base_model and Path(base_model).is_dir():
        base_model = str(Path(base_model).resolve())  # a local base: found again from any working directory
    metadata = {
        "base_model": base_model,
        "stage": getattr(peft_model, "cir_lora_stage", "in_batch"),
        "model_type": config.model_type,
        "fusion": getattr(config, "fusion", "sum"),
        "preprocessing": getattr(image_processor, "preprocessing", "targetpad"),
        "bidirectional": bool(getattr(config, "bidirectional", False)),
        "temperature": float(config.temperature),
        "base_fingerprint": getattr(peft_model, "cir_lora_base_fingerprint", None),
    }
    atomic_write_json(Path(output_dir) / LORA_METADATA, metadata, indent=2)


def lora_card_rows(model) -> list[tuple[str, str]]:
    """Model-card rows describing the adapter (none without LoRA); the card names the base model itself."""
    if not is_lora_model(model):
        return []
    config = model.peft_config["default"]
    saved = ", ".join(sorted(config.modules_to_save or [])) or "none"
    trainable = sum(p.numel() for p in lora_trainable_parameters(model))
    total = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n and "modules_to_save" not in n)
    shape = (f"r={config.r}, alpha={config.lora_alpha}, dropout={config.lora_dropout}; "
             f"{len(adapted_layers(model))} adapted layers; trained in full: {saved}")
    load = ("`modeling_spn4cir.loading.load_cir_model_and_processor(dir)` (needs `peft`); "
            "`trainers.lora.merge_lora(dir, out)` writes a plain checkpoint")
    return [("LoRA", shape), ("trainable parameters", f"{trainable:,} of {total:,}"), ("load", load)]


def merge_lora(adapter_dir, output_dir, overwrite: bool = False) -> Path:
    """Merge the adapter in `adapter_dir` into its base and write a plain checkpoint (weights, config, code for
    `trust_remote_code`, processor, card) that `AutoModel.from_pretrained` loads without `peft`. `output_dir` is
    written atomically and must not be (or contain) the adapter or its base: merging into the base would overwrite
    it, and the adapter, which names that base, would then be applied twice. `overwrite`: replace an earlier merge."""
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    metadata = json.loads((adapter_dir / LORA_METADATA).read_text())
    base = Path(metadata["base_model"]) if Path(metadata["base_model"]).is_dir() else None
    for source, what in ((base, "its base"), (adapter_dir, "the adapter")):
        out, src = output_dir.resolve(), source.resolve() if source is not None else None
        if src is not None and (out == src or out in src.parents):
            twice = " (and the adapter, which names it, would then be applied twice)" if source is base else ""
            raise OutputDirError(
                f"merge_lora: the output directory {output_dir} is or contains {what} {source}: writing it would "
                f"overwrite {what}{twice}. Write the merged checkpoint to a new directory (run_cir.py --merge_lora "
                "writes <output_dir>/merged).")
    model, processor = load_cir_model_and_processor(str(adapter_dir))  # merged
    hub_base = hub_base_model(metadata["base_model"])  # a Hub id, never a local path
    card = adapter_dir / "README.md"
    text = card.read_text() if card.exists() else render_card(cir_card_data(base_model=hub_base), output_dir.name)
    into = "its base model" if Path(metadata["base_model"]).exists() or hub_base is None else f"`{hub_base}`"
    with atomic_directory(output_dir, tool="trainers.lora.merge_lora", overwrite=overwrite,
                          protect=[adapter_dir, base]) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        apply_umask(staging)
        (staging / "README.md").write_text(with_model_id(
            text + f"\nThis checkpoint is the LoRA adapter `{adapter_dir.name}` merged into {into}: a plain "
                   "checkpoint, no `peft` needed.\n", output_dir.name))
    return output_dir


__all__ = ["LoRAArguments", "adapted_layers", "apply_lora", "check_lora_optimizer_scope", "is_lora_model", "lora_config_for",
           "lora_scope", "lora_trainable_parameters", "merge_lora", "write_lora_metadata"]
