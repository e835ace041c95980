"""A web demo: upload or pick a reference image, type the modification, see the top-k gallery images with scores.
A picked gallery image is queried by its id and, like an uploaded copy of a gallery image, left out of its own
results (as the evaluation protocols do) unless "keep the reference" is ticked.

    pip install -e ".[demo]"
    python examples/demo.py --model out/stage2 --index my_images.idx      # an index from examples/retrieve.py
    python examples/demo.py                                                # after `python examples/run_cir.py`:
                                                                           # its best model on its test gallery

With no `--model`, the demo reads the built-in recipe's `results.json` (`--recipe_dir`, default
`outputs/spn_recipe`), takes its best model by test Recall@10 and indexes the synthetic benchmark's test gallery
once (cached next to the recipe's outputs, rebuilt when the recipe's model changed). An index built by another model
is refused at start; a query that fails shows its error on the page; the results the page receives carry ids and
scores, no server paths, and only images under the index's gallery folders are shown. Everything runs locally;
nothing is downloaded.
"""

import argparse
import json
import re
import sys
from pathlib import Path

from retrieve import build_pipeline, load_model

from modeling_spn4cir.cli import add_debug_flag, run_cli
from modeling_spn4cir.retrieval import CIRIndex, ReportHit
from modeling_spn4cir.retrieval.report import hit_figure, report_css

# The built-in recipe's result rows and the directories of their models (examples/spn_recipe/config.py, MODEL_DIRS).
RECIPE_MODELS = {"stage 1": "stage1", "+N": "stage2_N", "+P": "stage1_P", "+P+N": "stage2_PN"}


def recipe_best_model(recipe_dir: str | Path, metric: str = "recall@10") -> tuple[Path, str]:
    """The built-in recipe's best model directory by test `metric`, and its row name."""
    results_file = Path(recipe_dir) / "results.json"
    if not results_file.exists():
        raise SystemExit(f"{results_file} not found: run `python examples/run_cir.py` first (the built-in recipe), "
                         "or pass --model and --index.")
    results = json.loads(results_file.read_text())["results"]
    row = max((r for r in RECIPE_MODELS if r in results), key=lambda r: results[r][metric])
    return Path(recipe_dir) / RECIPE_MODELS[row], row


# What a query can fail with, shown on the page (anything else is a bug: the page shows its traceback).
QUERY_ERRORS = (ValueError, KeyError, OSError, TypeError, RuntimeError)


class RetrievalDemo:
    """The demo's logic without the UI: `run(...)` is what the page calls."""

    def __init__(self, pipe, index: CIRIndex, thumb_size: int = 144):
        self.pipe, self.index, self.thumb_size = pipe, index, thumb_size

    def query(self, reference, text: str, top_k: int = 10, reference_id: str | None = None,
              keep_reference: bool = False) -> list[dict]:
        """The pipeline's results (`[{"image_id", "score", "path"}, ...]`) for a reference (an image, or a gallery
        image by `reference_id`) and/or a text; the reference is left out of its results unless `keep_reference`."""
        if reference_id is not None:
            return self.pipe(reference_id=reference_id, text=text or None, gallery=self.index, top_k=int(top_k),
                             keep_reference=keep_reference)
        return self.pipe(reference, text or None, gallery=self.index, top_k=int(top_k), keep_reference=keep_reference)

    def run(self, reference, text: str, top_k: int = 10, reference_id: str | None = None,
            keep_reference: bool = False) -> tuple[str, list[dict] | dict, str]:
        """(the results as HTML, the results as JSON, the status line) — the outputs of the page. The JSON results
        carry ranks, ids and scores only (no server paths); a query that fails shows its error's message (server
        folders shortened) in the status line and the JSON."""
        if reference is None and reference_id is None and not (text or "").strip():
            return "", {}, f"**{EMPTY_QUERY}.**"
        try:
            hits = self.query(reference, text, top_k, reference_id, keep_reference)
            page = self.results_html(hits)
        except QUERY_ERRORS as error:
            message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
            shown = f"{type(error).__name__}: {without_paths(str(message) or repr(error))}"
            return "", {"error": shown}, f"**{shown}**"
        rows = [{"rank": rank, "image_id": h["image_id"], "score": round(h["score"], 6)}
                for rank, h in enumerate(hits, 1)]
        return page, rows, self.describe(reference is not None, reference_id, keep_reference, len(hits))

    def results_html(self, hits: list[dict]) -> str:
        """The ranked images as figures (thumbnail, then rank, score and id below it), wrapping into rows."""
        figures = [hit_figure(ReportHit(h["image_id"], h["score"], self.index.open_image(h["image_id"]), rank),
                              self.thumb_size) for rank, h in enumerate(hits, 1)]
        return f"<div class='row' id='hits'>{''.join(figures)}</div>"

    def describe(self, has_image: bool, reference_id: str | None, keep_reference: bool, shown: int) -> str:
        """The status line above the results: how many are shown, and what the reference was."""
        if not has_image and reference_id is None:
            return f"top {shown} of {len(self.index)} images; a text-only query"
        where = f"gallery image `{reference_id}`" if reference_id is not None else "the uploaded image"
        kept = "kept in its results" if keep_reference else "left out of its results when it is in the gallery"
        return f"top {shown} of {len(self.index)} images; reference: {where} ({kept})"

    def examples(self, n: int = 6) -> list[str]:
        """The ids of a few gallery images to start from (the first of every len/n)."""
        step = max(1, len(self.index) // n)
        return [self.index.image_ids[i] for i in range(0, len(self.index), step)][:n]


EMPTY_QUERY = "Upload or pick a reference image, type a modification, or both"
# Small gallery images are drawn at the reference box's size (not at their own few pixels), sharp; the pick strip
# holds its thumbnails in two rows without a scrollbar of its own.
CSS = report_css(144) + """
#reference img { width: 100% !important; height: 100% !important; object-fit: contain; image-rendering: pixelated; }
#picks .grid-wrap { overflow: visible !important; min-height: 0 !important; max-height: none !important;
  height: auto !important; }
#picks .grid-container { min-height: 0 !important; padding-top: 30px !important; }
#results_html .row { gap: 10px; }
#status p { margin: 4px 0; }
"""


def without_paths(message: str) -> str:
    """`message` with every absolute path shortened to `.../<its last part>`: the browser learns no server folder."""
    return re.sub(r"(?<![\w.~])/(?:[^\s'\"(),;:/]+/)+([^\s'\"(),;:/]*)", r".../\1", message)


def gallery_roots(index: CIRIndex) -> list[str]:
    """The folders the index serves images from (`CIRIndex.open_image` refuses any file outside them)."""
    return sorted({s["root"] for s in index.sources if isinstance(s.get("root"), str)})


def recipe_index(model, processor, recipe_dir: str | Path, model_path: str) -> CIRIndex:
    """The built-in recipe's test gallery indexed by `model`, cached next to the recipe's outputs; a cache that is
    damaged or was built by another model (the recipe was run again) is built again."""
    from modeling_spn4cir.retrieval import IndexFileError, ModelMismatchError

    cached = Path(recipe_dir) / f"test_gallery.{Path(model_path).name}.idx"
    if cached.exists():
        try:
            index = CIRIndex.load(cached)
            index.check_model(model, processor.image_processor)
            return index
        except (IndexFileError, ModelMismatchError) as error:
            print(f"rebuilding the cached gallery index {cached}: {error}")
    benchmark = Path(recipe_dir).resolve() / "benchmark"
    if not benchmark.is_dir():
        raise SystemExit(f"--model {model_path} without --index: the demo indexes the built-in recipe's test gallery "
                         f"({benchmark}), which does not exist. Index your own images with `python examples/retrieve.py"
                         f" index --model {model_path} --images DIR --output DIR.idx` and pass --index DIR.idx.")
    import datasets

    dataset = {"path": str(benchmark), "name": "corpus", "split": "test"}
    index = CIRIndex.build(model, processor.image_processor, datasets.load_dataset(**dataset), dataset=dataset)
    index.save(cached, overwrite=cached.exists())
    return index


def build_ui(demo: RetrievalDemo, title: str):
    import gradio as gr

    picks_ids = demo.examples()
    with gr.Blocks(title=title) as ui:
        gr.Markdown(f"## {title}\nA reference image plus a modification text; the gallery's best matches, by the "
                    f"model's own similarity ({len(demo.index)} images).")
        picked = gr.State(None)  # the gallery id of a picked reference (None: an upload, or nothing)
        with gr.Row():
            with gr.Column(scale=1):
                reference = gr.Image(type="pil", label="reference image", height=256, elem_id="reference")
                shown_id = gr.Markdown("reference: none yet", elem_id="picked")
                text = gr.Textbox(label="modification", placeholder="e.g. make the red circle blue", elem_id="text")
                top_k = gr.Slider(1, 50, value=10, step=1, label="top k")
                keep = gr.Checkbox(False, label="keep the reference in its results")
                button = gr.Button("Search", variant="primary", elem_id="search")
                # Thumbnails without captions: the picked image's id is shown above once picked.
                picks = gr.Gallery(value=[demo.index.open_image(i) for i in picks_ids], columns=3, rows=2,
                                   label="or pick a reference from the gallery", height="auto", allow_preview=False,
                                   object_fit="contain", buttons=[], elem_id="picks")
            with gr.Column(scale=2):
                status = gr.Markdown("", elem_id="status")
                results = gr.HTML("", elem_id="results_html")
                raw = gr.JSON(label="results (JSON)")

        def pick(event: gr.SelectData):  # gradio passes the selection by this annotation (so no __future__ import)
            image_id = picks_ids[event.index]
            return (demo.index.open_image(image_id), image_id, f"reference: gallery image `{image_id}`", "", None,
                    "")

        def uploaded():
            return None, "reference: the uploaded image", "", None, ""

        def search(reference_image, image_id, query, k, keep_reference):
            return demo.run(reference_image, query, k, image_id if reference_image is not None else None,
                            keep_reference)

        cleared = [results, raw, status]
        picks.select(pick, None, [reference, picked, shown_id, *cleared])
        reference.upload(uploaded, None, [picked, shown_id, *cleared])
        reference.clear(lambda: (None, "reference: none yet", "", None, ""), None, [picked, shown_id, *cleared])
        inputs = [reference, picked, text, top_k, keep]
        button.click(search, inputs, cleared)
        text.submit(search, inputs, cleared)
    return ui


def launch(ui, host: str = "127.0.0.1", port: int = 7860, **kwargs):
    """Serve the page (with its style sheet) on `host:port`."""
    return ui.launch(server_name=host, server_port=port, css=CSS, **kwargs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a CIR checkpoint (default: the built-in recipe's best model)")
    parser.add_argument("--index", help="a gallery index from examples/retrieve.py (default: the recipe's test "
                                         "gallery)")
    parser.add_argument("--recipe_dir", default="outputs/spn_recipe")
    parser.add_argument("--device", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = add_debug_flag(parser).parse_args(sys.argv[1:] if argv is None else argv)
    title = "Composed image retrieval"
    benchmark = Path(args.recipe_dir) / "benchmark"
    if args.model is not None and args.index is None and not benchmark.is_dir():
        raise FileNotFoundError(
            f"--model {args.model} without --index searches the built-in recipe's test gallery ({benchmark}), which "
            "does not exist. Pass --index INDEX, an index of your images built by the same model (python "
            f"examples/retrieve.py index --model {args.model} --images DIR --output INDEX), or run python "
            "examples/run_cir.py first (the built-in recipe).")
    if args.model is None:
        model_dir, row = recipe_best_model(args.recipe_dir)
        args.model, title = str(model_dir), f"Composed image retrieval: the built-in recipe's {row} model"
    model, processor = load_model(args.model, args.device)
    if args.index is None:
        index = recipe_index(model, processor, args.recipe_dir, args.model)
    else:
        from modeling_spn4cir.retrieval import ModelMismatchError

        index = CIRIndex.load(args.index)
        try:  # refused now, not on every query
            index.check_model(model, processor.image_processor)
        except ModelMismatchError as error:
            raise SystemExit(f"--index {args.index} does not fit --model {args.model}: {error}") from None
    print(f"serving {len(index)} gallery images from {', '.join(gallery_roots(index)) or 'their dataset'}")
    demo = RetrievalDemo(build_pipeline(model, processor, args.device), index.to(model.device))
    launch(build_ui(demo, title), args.host, args.port)


if __name__ == "__main__":
    run_cli(main)
