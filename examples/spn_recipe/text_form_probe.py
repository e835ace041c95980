"""Diagnostic `--text_form_probe`: every row's model on the test queries twice — with their annotated texts (the
table) and with texts in the generated triplets' form (docs/reproduction.md: why zero-shot fails here)."""

from __future__ import annotations

from pathlib import Path

from datasets_scripts.synthetic import scene_captions
from datasets_scripts.templates import TEMPLATES
from modeling_spn4cir.storage import atomic_write_json
from modeling_spn4cir.loading import load_cir_model_and_processor
from trainers.evaluation import PROTOCOLS, CIREvaluator

from .config import MODEL_DIRS, ROWS, RecipeConfig
from .stamps import config_key, finished
from .steps import RecipeRun


def run_text_form_probe(cfg: RecipeConfig) -> dict:
    """The generated form is `"{target caption} instead of {reference caption}"` (template 0, captions from the
    scene graph). The annotated texts are edits of the reference ("make the yellow triangle pink"); the generated
    ones describe the whole target. A model that scores high on the second and low on the first has learnt to
    retrieve by a full description and to ignore the reference image. Needs a finished default run in
    `output_dir`; writes OUTPUT_DIR/text_form_probe.json."""
    out = Path(cfg.output_dir)
    if not finished(out / "results.json", cfg):
        raise FileNotFoundError(f"{out / 'results.json'} is not a finished default run of this config: run "
                                f"`python examples/run_cir.py --output_dir {out}` first.")
    run = RecipeRun(cfg)
    test, gallery = run.triplets["test"], run.corpus["test"]
    captions = scene_captions(dict(zip(gallery["image_id"], gallery["scene"])))
    texts = [[TEMPLATES[0].format(captions[r], captions[t])] for r, t in zip(test["reference_id"], test["target_id"])]
    probe = test.remove_columns("modification_texts").add_column("modification_texts", texts)
    evaluator = CIREvaluator(gallery, probe, run.processor.image_processor, run.tokenizer, protocol="recall",
                             batch_size=256, show_progress_bar=cfg.show_progress_bar)
    table = {}
    for row in ROWS:
        model = load_cir_model_and_processor(str(out / MODEL_DIRS[row]))[0]
        table[row] = {"annotated texts": run.evaluator(model), "generated-form texts": evaluator(model)}
    summary = {"protocol": PROTOCOLS["recall"] + " (synthetic benchmark, test split)", "rows": table,
               "example": {"annotated": test[0]["modification_texts"][0], "generated form": texts[0][0]},
               "config": config_key(cfg)}
    atomic_write_json(out / "text_form_probe.json", summary, indent=2)
    print("\nTest R@10 with the annotated texts and with generated-form texts (scene-graph captions)\n")
    print("| model | annotated texts | generated-form texts |\n|---|---|---|")
    for row, value in table.items():
        print(f"| {row} | {value['annotated texts']['recall@10']:.2f} | {value['generated-form texts']['recall@10']:.2f} |")
    return summary
