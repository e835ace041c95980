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
`--text` alone is a text-only query (sum-fusion CLIP4CIR), `--reference` alone an image-only one;
`--reference_id ID` takes the reference from the gallery by its id (e.g. of an index built from `--dataset`).
As the evaluation protocols do, the reference is left out of its own results when it is in the gallery (by id, or
for `--reference` by content); `--keep_reference` keeps it.

For large galleries, `index --faiss ivfpq` (or `hnsw`) builds a FAISS index saved with the gallery index and
searched with `search --backend faiss` (see `modeling_spn4cir/retrieval/faiss_backend.py`); one that no longer
matches the embeddings is rebuilt by the next FAISS search and saved back.

`--json` and `--html` follow the project's one output-file rule (`modeling_spn4cir.storage.write_output_file`): they
replace only a previous results file / page, never the reference image, a gallery image, the index's or the model's
files or any other file (checked before anything is computed). `index --skip_bad_images` leaves out images that
cannot be used (broken links, unreadable, truncated or undecodable files, decompression bombs), counted, instead of
stopping at the first one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from modeling_spn4cir.cli import add_debug_flag, run_cli
from modeling_spn4cir.image_files import open_image
from modeling_spn4cir.loading import load_cir_model_and_processor
from modeling_spn4cir.retrieval import CIRIndex, FaissSettings
from modeling_spn4cir.retrieval.index_storage import build_cache
from modeling_spn4cir.retrieval.report import HTML_SIGNATURE
from modeling_spn4cir.storage import check_output_file, write_output_file

RESULTS_FORMAT = "spn4cir-retrieval-results/1"
RESULTS_SIGNATURE = f'"format": "{RESULTS_FORMAT}"'.encode()  # the first key of every results file


def _looks_like_path(name: str) -> bool:
    """A --model value that can only be a local path (a Hub id is `name` or `org/name`)."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1
            or name.endswith("/"))


def load_model(name_or_path: str, device: str | None = None):
    """(model, processor) in eval mode on `device`; a local path is made absolute so that the index records
    where the model is."""
    local = Path(name_or_path).expanduser()
    if not local.exists() and _looks_like_path(name_or_path):
        raise SystemExit(f"--model {name_or_path}: no such directory ({local.absolute()}). Pass the directory of a "
                         "trained or converted CIR model (e.g. out/stage2), or a Hub model id (org/name).")
    model, processor = load_cir_model_and_processor(str(local.resolve()) if local.exists() else name_or_path)
    return model.to(device or "cpu").eval(), processor


def index_model(index: CIRIndex, index_path) -> str:
    """The model that built `index`, as it recorded it; a local directory that is gone is an error naming the fix."""
    recorded = index.fingerprint["model"]
    if Path(recorded).is_absolute() and not Path(recorded).exists():
        raise FileNotFoundError(f"The index {index_path} was built by the model at {recorded}, which does not exist "
                                "any more (moved or deleted): pass --model with its new location or its Hub id (the "
                                "same model; another one is refused).")
    return recorded


def build_pipeline(model, processor, device: str | None = None):
    from transformers import pipeline

    import modeling_spn4cir  # noqa: F401  (registers the "composed-image-retrieval" task)

    return pipeline("composed-image-retrieval", model=model, processor=processor,
                    device=device if device is not None else -1)


def index_command(args) -> CIRIndex:
    if args.images is None and args.dataset is None and args.faiss is not None:
        if not Path(args.output, "index.json").is_file():
            raise SystemExit(f"--faiss without --images / --dataset adds a FAISS index to the saved index --output, "
                             f"and {args.output} is not one; build it first (with --images or --dataset).")
        return add_faiss(CIRIndex.load(args.output), args)
    if (args.images is None) == (args.dataset is None):
        raise SystemExit("Pass --images DIR or --dataset DIR_OR_HUB_ID (with --split); or --faiss KIND alone to add a "
                         "FAISS index to the index --output.")
    # refused before any work: a missing input, an --output the index may not replace, a build folder holding
    # someone's files
    if args.images is not None and not Path(args.images).is_dir():
        raise SystemExit(f"--images {args.images}: no such folder.")
    if args.add and not Path(args.output, "index.json").is_file():
        raise SystemExit(f"--add: {args.output} is not a gallery index to add to; build one first (without --add).")
    CIRIndex.check_output(args.output, overwrite=args.add or args.overwrite_output_dir, protect=[args.images])
    cache_dir = Path(f"{args.output}.partial")
    cache = build_cache(cache_dir)
    model, processor = load_model(args.model, args.device)
    dataset = None
    if args.dataset is not None:
        import datasets

        dataset = {"path": args.dataset, "name": args.config, "split": args.split}
        images = datasets.load_dataset(**dataset)
    else:
        images = args.images
    kwargs = {"dataset": dataset, "batch_size": args.batch_size, "num_workers": args.num_workers,
              "cache_dir": cache_dir, "skip_bad_images": args.skip_bad_images}
    if args.add:
        index = CIRIndex.load(args.output).add(model, processor.image_processor, images, **kwargs)
    else:
        index = CIRIndex.build(model, processor.image_processor, images, dtype=getattr(torch, args.dtype), **kwargs)
    index.save(args.output, overwrite=args.add or args.overwrite_output_dir)
    cache.remove()  # its own files only
    print(f"wrote {args.output}: {index}")
    left_out = {k: v for k, v in index.sources[-1].items() if k in ("bad_images", "hidden_skipped", "other_files")}
    if left_out:
        bad = left_out.pop("bad_images", [])
        print(f"left out: {len(bad)} images that cannot be used (--skip_bad_images){f' {bad[:10]}' if bad else ''}"
              + "".join(f", {n} {k.replace('_', ' ')}" for k, n in left_out.items()))
    return add_faiss(index, args) if args.faiss is not None else index


def add_faiss(index: CIRIndex, args) -> CIRIndex:
    """Build the FAISS index of `--faiss` and save it into the saved index `--output` (after the gallery index
    itself, so that settings that do not fit the gallery cost no re-encoding)."""
    try:
        index.build_faiss(faiss_settings(args))
    except ValueError as error:
        raise SystemExit(f"{error}\nThe gallery index {args.output} is saved; to add a FAISS index to it, run "
                         f"`retrieve.py index --model {args.model} --output {args.output} --faiss ...` with other "
                         "settings (no --images / --dataset).") from error
    index.save_faiss(args.output)
    print(f"wrote {index.faiss_index()!r} into {args.output}")
    return index


def faiss_settings(args) -> FaissSettings:
    """The FAISS index `retrieve.py index --faiss KIND ...` asks for (0: FaissSettings' automatic value)."""
    return FaissSettings(kind=args.faiss, hnsw_m=args.hnsw_m, nlist=args.nlist, m=args.m, nbits=args.nbits,
                         nprobe=args.nprobe, train_size=args.train_size)


def _check_outputs(args, index: CIRIndex, model_path: str) -> None:
    """Refuse --json / --html paths the output-file rule forbids, before any work."""
    if args.json and args.html and Path(args.json).absolute() == Path(args.html).absolute():
        raise SystemExit(f"--json and --html are both {args.json}; pass two paths.")
    protect = [args.reference, args.index, model_path if Path(model_path).exists() else None]
    if args.json:
        check_output_file(args.json, RESULTS_SIGNATURE, "retrieval results file (--json)", protect)
    if args.html:
        check_output_file(args.html, HTML_SIGNATURE, "retrieval page (--html)", protect)


def _check_query(args, index: CIRIndex) -> None:
    """Refuse a query that names no reference and no text, two references, or a reference that does not exist."""
    if args.reference is None and args.reference_id is None and not (args.text or "").strip():
        raise SystemExit("Pass --reference IMAGE (or --reference_id GALLERY_ID), --text TEXT, or both.")
    if args.reference is not None and args.reference_id is not None:
        raise SystemExit("Pass --reference IMAGE or --reference_id GALLERY_ID, not both.")
    if args.reference is not None and not args.reference.startswith(("http://", "https://")) \
            and not Path(args.reference).is_file():
        raise FileNotFoundError(f"--reference {args.reference}: no such image file. Pass the path (or URL) of the "
                                "reference image, or --reference_id with the gallery id of one.")
    if args.reference_id is not None and args.reference_id not in index:
        raise SystemExit(f"--reference_id {args.reference_id!r} is not an image of the index {args.index} "
                         f"({len(index)} images, e.g. {index.image_ids[0]!r}).")


def search_command(args) -> list[dict]:
    index = CIRIndex.load(args.index)
    _check_query(args, index)
    model_path = args.model or index_model(index, args.index)
    _check_outputs(args, index, model_path)
    model, processor = load_model(model_path, args.device)
    pipe = build_pipeline(model, processor, args.device)
    index.to(model.device)
    had_faiss = index.has_faiss()
    hits = pipe(args.reference, args.text, reference_id=args.reference_id, gallery=index, top_k=args.top_k,
                backend=args.backend, keep_reference=args.keep_reference, nprobe=args.nprobe,
                ef_search=args.ef_search, refine=args.refine)
    if args.backend == "faiss" and not had_faiss:
        index.save_faiss(args.index)
        print(f"saved the FAISS index into {args.index} (later searches load it)")
    width = max((len(h["image_id"]) for h in hits), default=8)
    print(f"{'rank':>4}  {'image_id':<{width}}  score")
    for rank, hit in enumerate(hits, 1):
        print(f"{rank:>4}  {hit['image_id']:<{width}}  {hit['score']:.4f}")
    query = {"reference": args.reference, "reference_id": args.reference_id, "text": args.text,
             "keep_reference": args.keep_reference}
    protect = [args.reference, args.index, model_path if Path(model_path).exists() else None]
    if args.json:
        results = {"format": RESULTS_FORMAT, "query": query, "model": index.fingerprint["model"],
                   "index": str(args.index), "backend": args.backend, "results": hits}
        write_output_file(args.json, json.dumps(results, indent=2).encode(), RESULTS_SIGNATURE,
                          "retrieval results file (--json)", protect)
        print(f"wrote {args.json}")
    if args.html:
        write_results_html(args.html, index, hits, args.reference, args.text, args.reference_id, protect)
        print(f"wrote {args.html}")
    return hits


def write_results_html(path, index: CIRIndex, hits: list[dict], reference: str | None, text: str | None,
                       reference_id: str | None = None, protect=()) -> Path:
    """One query's results as a self-contained page (the retrieval report's layout), by the output-file rule; the
    reference is `reference_id`'s gallery image, or the file `reference`."""
    from modeling_spn4cir.retrieval import ReportHit, ReportRow, render_html
    from modeling_spn4cir.retrieval.report import write_page

    if reference_id is not None:
        reference_image = index.open_image(reference_id)
    else:
        reference_image = open_image(reference) if reference else None
        reference_id = Path(reference).name if reference else None
    row = ReportRow(text=text or "", reference_id=reference_id, reference_image=reference_image,
                    hits=[ReportHit(h["image_id"], h["score"], index.open_image(h["image_id"]), rank)
                          for rank, h in enumerate(hits, 1)])
    page = render_html([row], "Composed image retrieval", f"model {index.fingerprint['model']}; gallery "
                       f"{len(index)} images; reference framed blue.")
    return write_page(path, page, [reference, *protect])


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {value!r}")
    return number


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
    index.add_argument("--skip_bad_images", action="store_true",
                       help="leave out images that cannot be used (broken links, unreadable, truncated or undecodable "
                            "files, decompression bombs), counted, instead of stopping at the first one")
    index.add_argument("--batch_size", type=positive_int, default=64)
    index.add_argument("--num_workers", type=int, default=0, help="DataLoader workers decoding the images")
    index.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    index.add_argument("--device", default=None, help="e.g. cuda:0 (default: cpu)")
    index.add_argument("--faiss", choices=["hnsw", "ivfpq"], default=None,
                       help="also build a FAISS index for `search --backend faiss`, saved with the index: an HNSW "
                            "graph, or IVF-PQ for 1M+ images (m bytes per image)")
    index.add_argument("--nlist", type=int, default=0, help="IVF-PQ cells (default: 4 sqrt(N), a power of two)")
    index.add_argument("--m", type=int, default=0, help="IVF-PQ codes per image (default: width / 8)")
    index.add_argument("--nbits", type=int, default=8, help="IVF-PQ bits per code")
    index.add_argument("--nprobe", type=int, default=16, help="IVF-PQ cells a search visits (search can override)")
    index.add_argument("--train_size", type=int, default=0, help="IVF-PQ training images (default: 64 nlist)")
    index.add_argument("--hnsw_m", type=int, default=32, help="HNSW links per node")
    search = commands.add_parser("search", help="search an index with a composed query")
    search.add_argument("--index", required=True)
    search.add_argument("--model", help="default: the model that built the index")
    search.add_argument("--reference", help="the reference image file")
    search.add_argument("--reference_id", help="or the gallery id of the reference image")
    search.add_argument("--keep_reference", action="store_true",
                        help="keep the reference in its results (default: left out when it is in the gallery)")
    search.add_argument("--text", help="the modification text")
    search.add_argument("--top_k", type=positive_int, default=10)
    search.add_argument("--backend", default="exact", choices=["exact", "faiss"])
    search.add_argument("--nprobe", type=int, default=None, help="IVF-PQ cells to visit (default: the index's)")
    search.add_argument("--ef_search", type=int, default=None, help="HNSW search beam (default: max(128, 2 top_k))")
    search.add_argument("--refine", type=int, default=None,
                        help="FAISS candidates re-scored exactly per result (default: the index's: 50 for IVF-PQ)")
    search.add_argument("--json", help="write the results as JSON (replaces only an earlier results file)")
    search.add_argument("--html", help="write the results as an HTML page with thumbnails (replaces only an earlier "
                                       "page)")
    search.add_argument("--device", default=None)
    for command in (index, search):
        add_debug_flag(command)
    return parser


def main(argv=None):
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return index_command(args) if args.command == "index" else search_command(args)


if __name__ == "__main__":
    run_cli(main)
