"""The registry of CIR model families: what the package knows about a family is its `FamilySpec`.

Each family folder defines one `SPEC = FamilySpec(...)` (its classes, the base checkpoints it starts from, its
processor, converter, stage-1 objectives and paper facts); `modeling_spn4cir/__init__.py` registers it with one line,
`register_family(SPEC)`. Everything that used to be a table about families is a lookup here: base wrapping
(`loading`), converter dispatch (`convert_original_checkpoint`), the stage-1 loss (`trainers.losses`), the model
zoo's paper facts (`trainers.zoo`), the authors' backbone folders (`datasets_scripts.paper_triplets`), the CLI
choices (`examples/`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor, AutoTokenizer


@dataclass(frozen=True)
class BaseOptions:
    """How `load_cir_model_and_processor` builds a family on a base checkpoint (its keyword arguments)."""

    fusion: str = "sum"
    preprocessing: str = "targetpad"
    temperature: float | None = None
    bidirectional: bool = False

    def temperature_override(self) -> dict:
        """`{"temperature": tau}` when one was asked for, else `{}` (the family's default)."""
        return {} if self.temperature is None else {"temperature": self.temperature}


@dataclass(frozen=True)
class PaperFacts:
    """What the SPN paper and the authors' release say about a family (the model zoo's cards, the extend files).

    `reported` maps `(dataset, stage)` to the paper's numbers in the benchmark's metric order (`trainers.zoo.paper`):
    stage 2 is the "+SPN" row, stage 1 the base method's row."""

    method: str  # the paper's name of the base method
    backbone: str  # the backbone of the released checkpoints
    release_folder: str  # the authors' code folder, also the `<backbone>` of their extend files
    original_code: str  # whose evaluation code the reported numbers come from (protocol notes)
    reported: Mapping[tuple[str, int], tuple[float, ...]]
    stage2_temperature: Mapping[str, float] = field(default_factory=dict)  # dataset -> tau; else the checkpoint's
    removes_reference: frozenset[tuple[str, int]] = frozenset()  # (dataset, stage) evaluated without the reference
    # the image tower of the released checkpoints as the family's converter names it from the weights (`backbone()`):
    # only a checkpoint of this backbone carries the paper's numbers in the model zoo
    backbone_label: str | None = None
    # The paper's zero-shot rows (trained on generated triplets only): setting -> benchmark -> {metric: value},
    # metrics keyed like `CIREvaluator`'s; `zero_shot_source` says where they were read.
    zero_shot: Mapping[str, Mapping[str, Mapping[str, float]]] = field(default_factory=dict)
    zero_shot_source: str = ""


def _tokenizer_as_is(tokenizer, config):
    return tokenizer


def fit_context_length(tokenizer, config):
    """The tokenizer truncating at the text tower's context length (`config.text_config.max_position_embeddings`):
    a `prepare_tokenizer` for families with a `text_config`."""
    tokenizer.model_max_length = config.text_config.max_position_embeddings
    return tokenizer


@dataclass(frozen=True)
class FamilySpec:
    """Everything the package needs to know about one CIR model family; see the module docstring."""

    name: str  # the config's model_type
    title: str  # how errors and model cards name it
    config_class: type
    model_class: type
    processor_class: type
    image_processor_class: type
    sub_configs: tuple[type, ...] = ()
    # base model_type -> (name_or_path, BaseOptions) -> the family's model built on that base checkpoint
    bases: Mapping[str, Callable] = field(default_factory=dict)
    load_tokenizer: Callable = AutoTokenizer.from_pretrained  # name_or_path -> the family's tokenizer
    prepare_tokenizer: Callable = _tokenizer_as_is  # (tokenizer, config) -> tokenizer fitted to the model
    preprocessing: str | None = None  # the only image preprocessing of the family; None: the caller's choice
    default_tokenizer: str | None = None  # the Hub tokenizer of the released checkpoints
    converter: str | None = None  # module converting the original checkpoints (imported on use)
    checkpoint_prefixes: tuple[str, ...] = ()  # top-level / state-dict key prefixes of those checkpoints
    stage1_losses: Mapping[str, type] = field(default_factory=dict)  # `config.stage1_loss` values -> loss class
    bidirectional_overrides: Mapping[str, object] | None = None  # config of the "+Bi" stage-1 option, if any
    paper: PaperFacts | None = None

    def build_processor(self, config, tokenizer=None, preprocessing: str | None = None):
        """The family's processor for a model of `config`: its image processor at the model's resolution
        (`preprocessing`, default TargetPad, unless the family has only one) and, with a tokenizer, the processor
        pairing it with the tokenizer fitted to the model; without one, the image processor alone."""
        mode = self.preprocessing or preprocessing or "targetpad"
        image_processor = self.image_processor_class(preprocessing=mode, size=config.image_size)
        if tokenizer is None:
            return image_processor
        return self.processor_class(image_processor=image_processor,
                                    tokenizer=self.prepare_tokenizer(tokenizer, config))

    def wrap_base(self, name_or_path: str, base_type: str, options: BaseOptions):
        """-> (model, processor): the family built on the base checkpoint `name_or_path` of model_type
        `base_type`, with the tokenizer saved there."""
        model = self.bases[base_type](name_or_path, options)
        processor = self.build_processor(model.config, self.load_tokenizer(name_or_path), options.preprocessing)
        return model, processor

    def converter_module(self):
        if self.converter is None:
            raise ValueError(f"The {self.name} family has no converter of original checkpoints.")
        return importlib.import_module(self.converter)

    def recognizes(self, keys: Iterable[str]) -> bool:
        """Whether checkpoint keys (top-level and state-dict) are in this family's original format."""
        return any(key.startswith(self.checkpoint_prefixes) for key in keys) if self.checkpoint_prefixes else False


# Registration order matters: the first family that starts from a base model_type is its default, and converter
# dispatch tries the families in this order.
FAMILIES: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec) -> FamilySpec:
    """Register a family with the transformers Auto classes (and for `trust_remote_code` saving) and here."""
    config_class = spec.config_class
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    for sub_config in spec.sub_configs:
        AutoConfig.register(sub_config.model_type, sub_config, exist_ok=True)
    AutoModel.register(config_class, spec.model_class, exist_ok=True)
    config_class.register_for_auto_class()
    spec.model_class.register_for_auto_class("AutoModel")
    AutoImageProcessor.register(config_class, image_processor_classes={"pil": spec.image_processor_class},
                                exist_ok=True)
    spec.image_processor_class.register_for_auto_class("AutoImageProcessor")
    AutoProcessor.register(config_class, spec.processor_class, exist_ok=True)
    spec.processor_class.register_for_auto_class("AutoProcessor")
    FAMILIES[spec.name] = spec
    return spec


def family(name: str) -> FamilySpec:
    """The registered family `name` (a config's model_type); the error lists the known ones."""
    if name not in FAMILIES:
        raise ValueError(f"unknown CIR family {name!r}; registered: {', '.join(FAMILIES)}.")
    return FAMILIES[name]


def family_of(model_or_config) -> FamilySpec | None:
    """The family of a model or config (by its model_type), None for a model of no registered family."""
    config = getattr(model_or_config, "config", model_or_config)
    return FAMILIES.get(getattr(config, "model_type", None))


def families_for_base(model_type: str) -> list[FamilySpec]:
    """The families that can start from a base checkpoint of `model_type` (`"clip"`, ...), the default first."""
    return [spec for spec in FAMILIES.values() if model_type in spec.bases]


def base_model_types() -> list[str]:
    return list(dict.fromkeys(base for spec in FAMILIES.values() for base in spec.bases))


def base_families_help() -> str:
    """`"clip: clip4cir (default) or tgcir; blip: blip4cir; ..."`, for CLI help texts."""
    parts = []
    for base in base_model_types():
        names = [spec.name for spec in families_for_base(base)]
        default = f"{names[0]} (default)" if len(names) > 1 else names[0]
        parts.append(f"{base}: {' or '.join([default, *names[1:]])}")
    return "; ".join(parts)


def family_of_checkpoint(data: dict) -> FamilySpec | None:
    """The family whose original checkpoint format a loaded checkpoint dict is in, from its top-level and
    `state_dict` keys; None when no family recognizes them."""
    keys = [str(k) for k in data]
    if isinstance(data.get("state_dict"), dict):
        keys += [str(k) for k in data["state_dict"]]
    return next((spec for spec in FAMILIES.values() if spec.recognizes(keys)), None)


def family_of_release_folder(folder: str) -> FamilySpec | None:
    """The family of the SPN authors' code folder / extend-file backbone `folder` (`"blip2"` -> SPRC)."""
    return next((spec for spec in FAMILIES.values() if spec.paper and spec.paper.release_folder == folder), None)


__all__ = ["FAMILIES", "BaseOptions", "FamilySpec", "PaperFacts", "base_families_help", "base_model_types",
           "families_for_base", "family", "family_of", "family_of_checkpoint", "family_of_release_folder",
           "fit_context_length", "register_family"]
