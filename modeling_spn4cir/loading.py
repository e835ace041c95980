"""Load any CIR model and its processor, or wrap a plain CLIP / BLIP / BLIP-2 checkpoint as a CIR family."""

from __future__ import annotations

import contextlib
from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoProcessor, AutoTokenizer

from .cir_contract import CIRModelMixin
from .clip4cir import CLIP4CIRImageProcessor, CLIP4CIRModel, CLIP4CIRProcessor

# Which CIR families can start from which base checkpoint (`model_type` of its config), the first one by default.
BASE_FAMILIES = {"clip": ("clip4cir", "tgcir"), "blip": ("blip4cir",), "blip-2": ("sprc",)}
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
    """A LoRA adapter directory: its base rebuilt as it was trained (stage 2: after `freeze_target_side()`), the
    adapter applied and, unless `merge=False` (then a `peft.PeftModel`), merged into a plain CIR model whose
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
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    if meta["stage"] == "candidate_bank":
        model.freeze_target_side()  # the stage-2 preparation the adapter was trained on (SPRC, TG-CIR change here)
    with _name_unreadable_weights(adapter_dir):
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    processor = AutoProcessor.from_pretrained(adapter_dir)
    if not merge:
        return model, processor
    model = model.merge_and_unload()
    model.name_or_path = model.config._name_or_path = str(adapter_dir)  # an adapter trained on it names this dir
    model._target_side_frozen = False
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(trainable.get(name, True))
    return model, processor


def _wrap_base(name_or_path: str, family: str, fusion: str, preprocessing: str, temperature: float | None,
               bidirectional: bool = False):
    """A CIR model of `family` built on a base checkpoint, with the family's processor (the original's preprocessing:
    TargetPad 1.25 for CLIP4CIR / BLIP4CIR / SPRC, CLIP's resize + center crop for TG-CIR)."""
    tau = {} if temperature is None else {"temperature": temperature}
    if family == "clip4cir":
        model = CLIP4CIRModel.from_clip(name_or_path, fusion=fusion, temperature=temperature or 0.02)
        image_processor = CLIP4CIRImageProcessor(preprocessing=preprocessing, size=model.config.image_size)
        return model, CLIP4CIRProcessor(image_processor=image_processor,
                                        tokenizer=AutoTokenizer.from_pretrained(name_or_path))
    if family == "tgcir":
        from .tgcir import TGCIRModel, TGCIRProcessor

        model = TGCIRModel.from_clip(name_or_path, **tau)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        tokenizer.model_max_length = model.config.text_config.max_position_embeddings
        image_processor = CLIP4CIRImageProcessor(preprocessing="resize", size=model.config.image_size)
        return model, TGCIRProcessor(image_processor=image_processor, tokenizer=tokenizer)
    if family == "blip4cir":
        from .blip4cir import BLIP4CIRModel, BLIP4CIRProcessor
        from .blip4cir.processing_blip4cir import add_blip_special_tokens

        model = BLIP4CIRModel.from_blip(name_or_path, bidirectional=bidirectional, **tau)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        add_blip_special_tokens(tokenizer)
        image_processor = CLIP4CIRImageProcessor(preprocessing=preprocessing, size=model.config.image_size)
        return model, BLIP4CIRProcessor(image_processor=image_processor, tokenizer=tokenizer)
    if family == "sprc":
        from .sprc import SPRCModel, SPRCProcessor
        from .sprc.convert_sprc_original_checkpoint import build_tokenizer

        model = SPRCModel.from_blip2(name_or_path, **tau)
        image_processor = CLIP4CIRImageProcessor(preprocessing=preprocessing, size=model.config.image_size)
        return model, SPRCProcessor(image_processor=image_processor, tokenizer=build_tokenizer(name_or_path))
    raise ValueError(f"unknown CIR family {family!r}")


def load_cir_model_and_processor(name_or_path: str, fusion: str = "sum", preprocessing: str = "targetpad",
                                 temperature: float | None = None, model_type: str | None = None,
                                 bidirectional: bool = False, merge_lora: bool = True):
    """-> (model, processor).

    - a CIR checkpoint of any family (`clip4cir`, `tgcir`, `blip4cir`, `sprc`; a converted original checkpoint or
      a CIRTrainer output): loaded as saved, with its processor;
    - a base checkpoint to start stage 1 from: a CLIP (`model_type` `clip`, e.g. `openai/clip-vit-base-patch32`)
      as CLIP4CIR (`fusion`) or, with `model_type="tgcir"`, TG-CIR; a BLIP retrieval checkpoint (`blip`) as
      BLIP4CIR; a BLIP-2 (`blip-2`) as SPRC — with the family's processor (`preprocessing` where the family's
      original offers a choice).

    `bidirectional=True` (BLIP4CIR only) adds Bi-BLIP4CIR's "+Bi" stage-1 objective and its learnable reversal
    token (a new parameter when the checkpoint has none).

    A LoRA adapter directory written by `CIRTrainer` (`--lora_r`; needs `peft`) loads its base and applies the
    adapter, merged into the weights (`merge_lora=False`: a `peft.PeftModel`); the other arguments are ignored.
    """
    if Path(name_or_path, LORA_METADATA).is_file():
        return _load_lora_adapter(name_or_path, merge_lora)
    config = AutoConfig.from_pretrained(name_or_path)
    if config.model_type in BASE_FAMILIES:
        families = BASE_FAMILIES[config.model_type]
        family = model_type or families[0]
        if family not in families:
            raise ValueError(f"--model_type {family} cannot start from a {config.model_type!r} checkpoint "
                             f"({name_or_path}); it starts from: {', '.join(families)}.")
        if bidirectional and family != "blip4cir":
            raise ValueError("bidirectional (+Bi) training exists for BLIP4CIR only.")
        with _name_unreadable_weights(name_or_path):
            model, processor = _wrap_base(name_or_path, family, fusion, preprocessing, temperature, bidirectional)
    else:
        if bidirectional and config.model_type != "blip4cir":
            raise ValueError(f"bidirectional (+Bi) training exists for BLIP4CIR only; {name_or_path} is "
                             f"{config.model_type!r}.")
        overrides = {"bidirectional": True, "stage1_loss": "blip4cir_bidirectional"} if bidirectional else {}
        with _name_unreadable_weights(name_or_path):
            model = AutoModel.from_pretrained(name_or_path, **overrides)
        if not isinstance(model, CIRModelMixin):
            raise ValueError(
                f"{name_or_path} is a {config.model_type!r} checkpoint; expected a CIR checkpoint (clip4cir, tgcir, "
                "blip4cir, sprc) or a base checkpoint to wrap (clip, blip, blip-2)."
            )
        if model_type is not None and config.model_type != model_type:
            raise ValueError(f"{name_or_path} is a {config.model_type!r} model, not {model_type!r}.")
        processor = AutoProcessor.from_pretrained(name_or_path)
    if temperature is not None:
        model.config.temperature = temperature
    return model, processor
