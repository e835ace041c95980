"""Model cards, written once: the YAML metadata through `huggingface_hub.ModelCardData` (library, the nearest
standard pipeline tag, base model and datasets as Hub ids, license, `model-index`), then the markdown with a usage
snippet that runs. Used by the converters (`conversion_utils.conversion_card`), the model zoo (`trainers.zoo.cards`)
and `CIRTrainer` (`trainers.model_card`)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from huggingface_hub import ModelCardData

# The Hub has no composed-image-retrieval task: a CIR model embeds images and (image, text) queries for retrieval,
# which is the standard "image-feature-extraction" task; the task's own name goes into `model-index`.
PIPELINE_TAG = "image-feature-extraction"
TASK_NAME = "Composed Image Retrieval"
TAGS = ("composed-image-retrieval", "spn4cir")
# What the Hub accepts as a repo id: `name` or `namespace/name` (no path separators, no "..", no "--").
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# A snapshot in the Hugging Face cache: .../models--{namespace}--{name}/snapshots/{revision}
_CACHE_SNAPSHOT = re.compile(r"/models--([^/]+)/snapshots/[^/]+/?$")
MODEL_ID_PLACEHOLDER = "<this repo>"
# Percent metrics in `model-index`: float32 noise (38.999998569488525) gone, the precision kept; tables show 2.
INDEX_DECIMALS, TABLE_DECIMALS = 4, 2


def usage(model_id: str = MODEL_ID_PLACEHOLDER) -> str:
    """A `## Usage` section that runs as written once `model_id` is the model's directory or Hub id (with the
    package installed; `MODEL_ID_PLACEHOLDER` until it is known, see `with_model_id`): index a folder of images,
    then search it with a composed query."""
    return f"""## Usage

```python
import modeling_spn4cir  # registers the model families and the "composed-image-retrieval" pipeline
from modeling_spn4cir.retrieval import CIRIndex
from transformers import pipeline

pipe = pipeline("composed-image-retrieval", model="{model_id}")
gallery = CIRIndex.build(pipe.model, pipe.image_processor, "my_images/")  # every image under the folder, once
hits = pipe("query.jpg", "is red and sleeveless", gallery=gallery, top_k=5)  # reference image + modification
print(hits)  # [{{"image_id": "dresses/B00X.jpg", "score": 0.41, "path": ...}}, ...], best first
```"""


_USAGE_MODEL = re.compile(r'(pipeline\("composed-image-retrieval", model=)"[^"\n]*"')


def with_model_id(card: str, model_id: str) -> str:
    """`card` with its usage snippet loading `model_id` (the model's directory or Hub id) instead of the
    placeholder or the id it had (a card copied to another directory or repo)."""
    return _USAGE_MODEL.sub(lambda m: f'{m.group(1)}"{model_id}"', card)


def hub_base_model(name_or_path: str | os.PathLike | None) -> str | list[str] | None:
    """The Hub id to record as `base_model` of a model trained from `name_or_path`, never a local path: the id
    itself when it names a Hub repo (or a snapshot of one in the Hugging Face cache); for a local checkpoint, the
    `base_model` its card records (a model trained here from a Hub model); else None (built from a config, or a
    local checkpoint of unknown origin)."""
    if not name_or_path:
        return None
    name = str(name_or_path)
    path = Path(name).expanduser()
    if not path.exists():
        return name if HUB_ID.fullmatch(name) else None
    cached = _CACHE_SNAPSHOT.search(path.resolve().as_posix())
    if cached:
        return cached.group(1).replace("--", "/", 1)
    return card_data(path).get("base_model")


def hub_dataset_id(name: str | None) -> str | None:
    """`name` when it is a Hub dataset id rather than a local directory, else None."""
    if not name or Path(name).expanduser().exists():
        return None
    return name if HUB_ID.fullmatch(name) else None


def card_data(model_dir: str | os.PathLike) -> dict:
    """The metadata of the card (README.md) in `model_dir`, `{}` when it has none or it does not parse."""
    import yaml
    from huggingface_hub import ModelCard

    readme = Path(model_dir) / "README.md"
    if not readme.is_file():
        return {}
    try:
        return ModelCard.load(readme).data.to_dict()
    except (ValueError, yaml.YAMLError):  # a hand-written README whose front matter does not parse: nothing to inherit
        return {}


def cir_card_data(model_name: str | None = None, tags: Iterable[str] = (), **fields) -> ModelCardData:
    """`ModelCardData` with what every CIR card shares (library, pipeline tag, tags) and `fields` (`base_model`,
    `datasets`, `license`, `eval_results`, ...; None values left out)."""
    return ModelCardData(model_name=model_name, library_name="transformers", pipeline_tag=PIPELINE_TAG,
                         tags=[*TAGS, *tags], **{k: v for k, v in fields.items() if v is not None})


def eval_results(metrics: Mapping[str, float], dataset_type: str, dataset_name: str, split: str, protocol: str,
                 label: str = "", **extra) -> list:
    """One `model-index` entry (`huggingface_hub.EvalResult`) per numeric metric: the task, the dataset and its
    split, the metric named with its evaluation `protocol` (a `trainers.evaluation.PROTOCOLS` name, also the
    metric config) and `label` (e.g. "reported"), its value rounded to `INDEX_DECIMALS`; `extra`: more
    `EvalResult` fields (e.g. `source_name`)."""
    from huggingface_hub import EvalResult

    suffix = f" ({label})" if label else ""
    return [EvalResult(task_type=PIPELINE_TAG, task_name=TASK_NAME, dataset_type=dataset_type,
                       dataset_name=dataset_name, dataset_split=split, metric_type=key,
                       metric_value=round(float(value), INDEX_DECIMALS),
                       metric_name=f"{key}, {protocol} protocol{suffix}", metric_config=protocol, **extra)
            for key, value in metrics.items() if isinstance(value, (int, float)) and not isinstance(value, bool)]


def table(rows: Iterable[tuple[str, object]], header: tuple[str, str] = ("field", "value")) -> str:
    """A two-column markdown table."""
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    return "\n".join(lines + [f"| {name} | {value} |" for name, value in rows])


def metrics_table(metrics: Mapping[str, float]) -> str:
    """A metric | value table, values rounded to `TABLE_DECIMALS` for reading."""
    return table([(k, f"{v:.{TABLE_DECIMALS}f}") for k, v in metrics.items()], header=("metric", "value"))


def render_card(metadata: ModelCardData, title: str, *sections: str) -> str:
    """`---` YAML front matter `---`, `# title`, then the non-empty `sections` as paragraphs."""
    body = "\n\n".join(section.strip("\n") for section in sections if section)
    return f"---\n{metadata.to_yaml()}\n---\n# {title}\n\n{body}\n"


__all__ = ["HUB_ID", "MODEL_ID_PLACEHOLDER", "PIPELINE_TAG", "TAGS", "TASK_NAME", "card_data", "cir_card_data",
           "eval_results", "hub_base_model", "hub_dataset_id", "metrics_table", "render_card", "table", "usage",
           "with_model_id"]
