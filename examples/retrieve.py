"""Use a trained CIR model on your own images: index a gallery once, then search it with composed queries.

    python examples/retrieve.py index --model out/stage2 --images my_images/ --output my_images.idx
    python examples/retrieve.py search --index my_images.idx --reference query.jpg --text "is red and sleeveless" \\
        --top_k 10 --json hits.json --html hits.html

`index` encodes every image under the folder (or a corpus: `--dataset DIR_OR_HUB_ID --split test`) with the
model's target side and writes a `CIRIndex` (safetensors shards + JSON with the model fingerprint); `--add` appends
new images to an existing index built by the same model. It encodes in shards kept in `<output>.partial/`, so a
killed run resumes where it stopped when run again; that folder is removed once the index is written. `search`
loads the model the index was built with (or `--model`; another model is refused), composes the query with the
"composed-image-retrieval" pipeline, ranks exactly (or `--backend faiss`), prints the results, and writes them as
JSON and as an HTML page with thumbnails.
`--text` alone is a text-only query (sum-fusion CLIP4CIR), `--reference` alone an image-only one.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from modeling_spn4cir.loading import load_cir_model_and_processor
from modeling_spn4cir.retrieval import CIRIndex
from modeling_spn4cir.storage import atomic_write_bytes, atomic_write_json


def load_model(name_or_path: str, device: str | None = None):
    """(model, processor) in eval mode on `device`; a local path is made absolute so that the index records
    where the model is."""
    local = Path(name_or_path)
    model, processor = load_cir_model_and_processor(str(local.resolve()) if local.exists() else name_or_path)
    return model.to(device or "cpu").eval(), processor


def build_pipeline(model, processor, device: str | None = None):
    from transformers import pipeline

    import modeling_spn4cir  # noqa: F401  (registers the "composed-image-retrieval" task)

    return pipeline("composed-image-retrieval", model=model, processor=processor,
                    device=device if device is not None else -1)


def index_command(args) -> CIRIndex:
    model, processor = load_model(args.model, args.device)
    if (args.images is None) == (args.dataset is None):
        raise SystemExit("Pass --images DIR or --dataset DIR_OR_HUB_ID (with --split).")
    dataset = None
    if args.dataset is not None:
        import datasets

        dataset = {"path": args.dataset, "name": args.config, "split": args.split}
        images = datasets.load_dataset(**dataset)
    else:
        images = args.images
    cache_dir = Path(f"{args.output}.partial")
    kwargs = dict(dataset=dataset, batch_size=args.batch_size, num_workers=args.num_workers, cache_dir=cache_dir)
    if args.add:
        index = CIRIndex.load(args.output).add(model, processor.image_processor, images, **kwargs)
    else:
        index = CIRIndex.build(model, processor.image_processor, images, dtype=getattr(torch, args.dtype), **kwargs)
    index.save(args.output, overwrite=args.add or args.overwrite_output_dir)
    shutil.rmtree(cache_dir, ignore_errors=True)
    print(f"wrote {args.output}: {index}")
    return index


def search_command(args) -> list[dict]:
    if args.reference is None and not args.text:
        raise SystemExit("Pass --reference IMAGE, --text TEXT, or both.")
    index = CIRIndex.load(args.index)
    model, processor = load_model(args.model or index.fingerprint["model"], args.device)
    pipe = build_pipeline(model, processor, args.device)
    index.to(model.device)
    hits = pipe(args.reference, args.text, gallery=index, top_k=args.top_k, backend=args.backend)
    width = max((len(h["image_id"]) for h in hits), default=8)
    print(f"{'rank':>4}  {'image_id':<{width}}  score")
    for rank, hit in enumerate(hits, 1):
        print(f"{rank:>4}  {hit['image_id']:<{width}}  {hit['score']:.4f}")
    query = {"reference": args.reference, "text": args.text}
    if args.json:
        atomic_write_json(args.json, {"query": query, "model": index.fingerprint["model"], "index": str(args.index),
                                      "backend": args.backend, "results": hits}, indent=2)
        print(f"wrote {args.json}")
    if args.html:
        write_results_html(args.html, index, hits, args.reference, args.text)
        print(f"wrote {args.html}")
    return hits


def write_results_html(path, index: CIRIndex, hits: list[dict], reference: str | None, text: str | None) -> Path:
    """One query's results as a self-contained page (the retrieval report's layout)."""
    from PIL import Image

    from modeling_spn4cir.retrieval import ReportHit, ReportRow, render_html

    row = ReportRow(text=text or "", reference_id=Path(reference).name if reference else None,
                    reference_image=Image.open(reference).convert("RGB") if reference else None,
                    hits=[ReportHit(h["image_id"], h["score"], index.open_image(h["image_id"]), rank)
                          for rank, h in enumerate(hits, 1)])
    page = render_html([row], "Composed image retrieval", f"model {index.fingerprint['model']}; gallery "
                       f"{len(index)} images; reference framed blue.")
    return atomic_write_bytes(path, page.encode())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", help="encode a gallery into an index")
    index.add_argument("--model", required=True, help="a CIR checkpoint directory or Hub id")
    index.add_argument("--images", help="a folder of images (searched recursively)")
    index.add_argument("--dataset", help="or a dataset in the project schema (its corpus config)")
    index.add_argument("--config", default="corpus", help="the dataset config holding the images")
    index.add_argument("--split", default="test", help="the dataset split whose corpus is the gallery")
    index.add_argument("--output", required=True, help="the index directory to write")
    index.add_argument("--add", action="store_true", help="append the images to the existing index --output")
    index.add_argument("--overwrite_output_dir", action="store_true",
                       help="replace --output when it holds a previously saved index (never other files)")
    index.add_argument("--batch_size", type=int, default=64)
    index.add_argument("--num_workers", type=int, default=0, help="DataLoader workers decoding the images")
    index.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    index.add_argument("--device", default=None, help="e.g. cuda:0 (default: cpu)")
    search = commands.add_parser("search", help="search an index with a composed query")
    search.add_argument("--index", required=True)
    search.add_argument("--model", help="default: the model that built the index")
    search.add_argument("--reference", help="the reference image file")
    search.add_argument("--text", help="the modification text")
    search.add_argument("--top_k", type=int, default=10)
    search.add_argument("--backend", default="exact", choices=["exact", "faiss"])
    search.add_argument("--json", help="write the results as JSON")
    search.add_argument("--html", help="write the results as an HTML page with thumbnails")
    search.add_argument("--device", default=None)
    return parser


def main(argv=None):
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return index_command(args) if args.command == "index" else search_command(args)


if __name__ == "__main__":
    main()
