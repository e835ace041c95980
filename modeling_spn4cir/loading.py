"""Load any CIR model and its processor, or wrap a base checkpoint (CLIP, BLIP, BLIP-2, ...) as a CIR family: which
family starts from which base, and how, is the family's spec (`families.FamilySpec.bases`)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoProcessor

from .cir_contract import is_cir_model
from .families import FAMILIES, BaseOptions, base_model_types, families_for_base, family
from .model_cards import HUB_ID

# Written beside a LoRA adapter (`trainers.lora`): the base and how to rebuild it.
LORA_METADATA = "spn4cir_lora.json"


def _unreadable_weight_files(name_or_path: str) -> list[str]:
    """The weight files of a local checkpoint directory that cannot be opened (truncated or corrupt)."""
    from safetensors import safe_open

    folder = Path(name_or_path)
    if not folder.is_dir():
        return []
    bad = []
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):
                pass
        except Exception:  # any header error: truncated, empty, not safetensors
            bad.append(str(path))
    return bad


@contextlib.contextmanager
def _name_unreadable_weights(name_or_path: str):
    """Re-raise a weight file's read error (safetensors' says no path) naming the file and what to do."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, EOFError) as error:
        files = _unreadable_weight_files(name_or_path) or [f"the weight files of {name_or_path}"]
        raise OSError(
            f"Cannot read {', '.join(files)}: {error}. The file is truncated or corrupt (an interrupted download, "
            "copy or save): re-download it (e.g. `huggingface-cli download --force-download`), or re-convert / "
            "re-save the checkpoint."
        ) from error


def _load_lora_adapter(adapter_dir: str, merge: bool):
    """A LoRA adapter directory: its base rebuilt as it was trained (stage 2: after `untie_query_side()` and
    `freeze_target_side()`), the adapter applied and, unless `merge=False` (then a `peft.PeftModel`), merged into a
    plain CIR model whose
    parameters train as the base's did; with the processor saved beside the adapter."""
    import json

    from peft import PeftModel

    meta = json.loads((Path(adapter_dir) / LORA_METADATA).read_text())
    try:
        model, _ = load_cir_model_and_processor(
            meta["base_model"], meta["fusion"], meta["preprocessing"], meta["temperature"],
            model_type=meta["model_type"], bidirectional=meta["bidirectional"])
    except OSError as error:
        raise OSError(f"The LoRA adapter {adapter_dir} was trained on {meta['base_model']!r} ({LORA_METADATA}), "
                      f"which cannot be loaded: {error}. Put the base there, or edit base_model in "
                      f"{Path(adapter_dir) / LORA_METADATA}.") from error
    _check_lora_base(adapter_dir, meta, model)
    if meta["stage"] == "candidate_bank":  # the stage-2 model the adapter was trained on
        model.untie_query_side()
        model.freeze_target_side()
    with _name_unreadable_weights(adapter_dir):
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    processor = AutoProcessor.from_pretrained(adapter_dir)
    if not merge:
        return model, processor
    model = model.merge_and_unload()
    model.name_or_path = model.config._name_or_path = str(adapter_dir)  # an adapter trained on it names this dir
    if model.target_side_frozen:
        model.unfreeze_target_side()
    return model, processor


def _check_lora_base(adapter_dir: str, meta: dict, model) -> None:
    """The base found at `meta["base_model"]` is the one the adapter was trained on: the same family, fusion and
    "+Bi" option, and (adapters from this version on) the same weights by content (`checkpoint_fingerprint`)."""
    import logging

    from .storage import checkpoint_fingerprint

    base = meta["base_model"]
    config = model.config
    found = {"model_type": config.model_type, "fusion": getattr(config, "fusion", "sum"),
             "bidirectional": bool(getattr(config, "bidirectional", False))}
    differ = [f"{key} {meta[key]!r} (now {value!r})" for key, value in found.items() if key in meta and meta[key] != value]
    hint = (f"Restore the base it was trained on at {base}, or retrain the adapter on this one (or edit base_model in "
            f"{Path(adapter_dir) / LORA_METADATA} to point at the original base).")
    if differ:
        raise ValueError(f"The LoRA adapter {adapter_dir} was trained on a base with {', '.join(differ)}: {base} is "
                         f"another model now, and the adapter would load onto it silently wrong. {hint}")
    recorded = meta.get("base_fingerprint")
    if recorded is None:
        logging.getLogger(__name__).warning(
            "The LoRA adapter %s records no fingerprint of its base (written by an older version): %s is assumed to "
            "be the base it was trained on.", adapter_dir, base)
        return
    now = checkpoint_fingerprint(base)
    if recorded.get("revision") is None and now.get("revision") is None and "weights" not in recorded:
        return  # a Hub base whose revision could not be told, then or now
    if now != recorded:
        what = ("other weight files" if "weights" in recorded else
                f"revision {now.get('revision')}, not {recorded.get('revision')}")
        raise ValueError(f"The LoRA adapter {adapter_dir} was trained on {base} as it was then; {base} now holds "
                         f"{what} (retrained, re-converted or replaced in place), so the adapter would give other "
                         f"embeddings than it was trained to. {hint}")
def _check_exists(name_or_path: str) -> None:
    """A path that exists nowhere and cannot be a Hub id: say so (huggingface_hub's "Repo id must be in the form
    'repo_name' or 'namespace/repo_name'" reads as if the argument were a malformed Hub id)."""
    if not Path(name_or_path).exists() and not HUB_ID.fullmatch(str(name_or_path)):
        raise FileNotFoundError(f"{name_or_path} does not exist (no such directory, and not a Hub model id): pass an "
                                "existing checkpoint directory or a Hub id such as openai/clip-vit-base-patch32.")


def _bidirectional_overrides(name: str, where: str = "") -> dict:
    """The config of the family's "+Bi" stage-1 option (`FamilySpec.bidirectional_overrides`); an error naming the
    families that have one when `name` has none."""
    spec = FAMILIES.get(name)
    if spec is None or spec.bidirectional_overrides is None:
        with_it = [s.title for s in FAMILIES.values() if s.bidirectional_overrides is not None]
        raise ValueError(f"bidirectional (+Bi) training exists for {', '.join(with_it)} only{where}.")
    return dict(spec.bidirectional_overrides)


def _wrap_base(name_or_path: str, base_type: str, model_type: str | None, options: BaseOptions):
    """A CIR model of `model_type` (default: the first family that starts from `base_type`) built on a base
    checkpoint, with the family's processor."""
    candidates = [spec.name for spec in families_for_base(base_type)]
    name = model_type or candidates[0]
    if name not in candidates:
        raise ValueError(f"--model_type {name} cannot start from a {base_type!r} checkpoint ({name_or_path}); it "
                         f"starts from: {', '.join(candidates)}.")
    if options.bidirectional:
        _bidirectional_overrides(name)
    return family(name).wrap_base(name_or_path, base_type, options)


def _load_cir_checkpoint(name_or_path: str, saved_type: str, model_type: str | None, bidirectional: bool):
    """A saved CIR model of any family, with its processor (`bidirectional`: switch its "+Bi" option on)."""
    overrides = _bidirectional_overrides(saved_type, f"; {name_or_path} is {saved_type!r}") if bidirectional else {}
    model = AutoModel.from_pretrained(name_or_path, **overrides)
    if not is_cir_model(model):
        raise ValueError(
            f"{name_or_path} is a {saved_type!r} checkpoint; expected a CIR checkpoint ({', '.join(FAMILIES)}) or a "
            f"base checkpoint to wrap ({', '.join(base_model_types())})."
        )
    if model_type is not None and saved_type != model_type:
        raise ValueError(f"{name_or_path} is a {saved_type!r} model, not {model_type!r}.")
    return model, AutoProcessor.from_pretrained(name_or_path)


def load_cir_model_and_processor(name_or_path: str, fusion: str = "sum", preprocessing: str = "targetpad",
                                 temperature: float | None = None, model_type: str | None = None,
                                 bidirectional: bool = False, merge_lora: bool = True):
    """-> (model, processor).

    - a CIR checkpoint of any registered family (a converted original checkpoint or a CIRTrainer output): loaded as
      saved, with its processor;
    - a base checkpoint to start stage 1 from, as the family `model_type` (default: the first registered family
      that starts from that base — `families.base_families_help()`): a CLIP (`model_type` `clip`, e.g.
      `openai/clip-vit-base-patch32`) as CLIP4CIR (`fusion`) or TG-CIR; a BLIP retrieval checkpoint (`blip`) as
      BLIP4CIR; a BLIP-2 (`blip-2`) as SPRC — with the family's processor (`preprocessing` where the family's
      original offers a choice).

    `bidirectional=True` (BLIP4CIR only) adds Bi-BLIP4CIR's "+Bi" stage-1 objective and its learnable reversal
    token (a new parameter when the checkpoint has none).

    A LoRA adapter directory written by `CIRTrainer` (`--lora_r`; needs `peft`) loads its base and applies the
    adapter, merged into the weights (`merge_lora=False`: a `peft.PeftModel`); the other arguments are ignored.
    """
    if Path(name_or_path, LORA_METADATA).is_file():
        return _load_lora_adapter(name_or_path, merge_lora)
    _check_exists(name_or_path)
    config = AutoConfig.from_pretrained(name_or_path)
    with _name_unreadable_weights(name_or_path):
        if config.model_type in base_model_types():
            options = BaseOptions(fusion, preprocessing, temperature, bidirectional)
            model, processor = _wrap_base(name_or_path, config.model_type, model_type, options)
        else:
            model, processor = _load_cir_checkpoint(name_or_path, config.model_type, model_type, bidirectional)
    if temperature is not None:
        model.config.temperature = temperature
    return model, processor
