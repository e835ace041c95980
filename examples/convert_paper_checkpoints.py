"""Turn the SPN authors' Hub release (`BUAADreamer/SPN4CIR`) into loadable model directories and datasets.

    python examples/convert_paper_checkpoints.py --output_dir spn4cir-zoo                      # downloads the release
    python examples/convert_paper_checkpoints.py --local_dir SPN4CIR --output_dir spn4cir-zoo \\
        --data_dir project_base_path                 # fashionIQ_dataset/ and cirr_dataset/: datasets + measured metrics
    python examples/convert_paper_checkpoints.py --local_dir SPN4CIR --output_dir spn4cir-zoo \\
        --push_to_hub --namespace <user>    # publishes spn4cir-clip4cir-fiq, spn4cir-fiq-scaled-triplets-clip, ...

Writes `models/`, `datasets/`, `dedup_maps/` and `conversion_report.json` (every file of the release: what it
became, or why not). See `trainers/zoo/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import HfArgumentParser

from modeling_spn4cir.cli import add_debug_flag, run_cli
from modeling_spn4cir.families import FAMILIES
from trainers.zoo import SOURCE_REPO, benchmark_dirs, build_zoo, push_zoo, snapshot


@dataclass
class ZooArguments:
    output_dir: str = field(metadata={"help": "where models/, datasets/, dedup_maps/ and the report are written"})
    repo_id: str = field(default=SOURCE_REPO, metadata={"help": "the release to download"})
    revision: str | None = field(default=None, metadata={"help": "revision of --repo_id"})
    local_dir: str | None = field(default=None, metadata={"help": "an existing copy of the release (no download)"})
    data_dir: str | None = field(default=None, metadata={
        "help": "SPN4CIR's project folder holding fashionIQ_dataset/ and/or cirr_dataset/: the generated-triplet "
                "datasets take their images from it, and every model is evaluated on its val split"})
    fashioniq_dir: str | None = field(default=None, metadata={"help": "FashionIQ (official layout or converted)"})
    cirr_dir: str | None = field(default=None, metadata={"help": "CIRR (official layout or converted)"})
    tokenizer: list[str] = field(default_factory=list, metadata={
        "help": "FAMILY=NAME_OR_PATH [FAMILY=NAME_OR_PATH ...] to replace a family's default tokenizer; NAME "
                "'none' saves only the image processor"})
    eval_batch_size: int = field(default=64)
    overwrite_output_dir: bool = field(default=False, metadata={"help": "replace the outputs of a previous run"})
    push_to_hub: bool = field(default=False, metadata={"help": "publish every model and dataset to --namespace"})
    namespace: str | None = field(default=None, metadata={"help": "Hub user or organization of the published repos"})
    private: bool = field(default=False)


def main(argv=None):
    (args,) = add_debug_flag(HfArgumentParser(ZooArguments)).parse_args_into_dataclasses(argv)
    if args.push_to_hub and not args.namespace:
        raise SystemExit("--push_to_hub needs --namespace (the Hub user or organization to publish to).")
    tokenizers = {}
    for item in args.tokenizer:
        family, sep, name = item.partition("=")
        if not sep:
            raise SystemExit(f"--tokenizer {item!r}: expected FAMILY=NAME_OR_PATH (FAMILY: {', '.join(FAMILIES)}).")
        tokenizers[family] = None if name.lower() == "none" else name
    fashioniq_dir, cirr_dir = benchmark_dirs(args.data_dir, args.fashioniq_dir, args.cirr_dir)
    source = snapshot(args.repo_id, args.local_dir, args.revision)
    report = build_zoo(source, args.output_dir, fashioniq_dir, cirr_dir, tokenizers, args.namespace,
                       args.eval_batch_size, args.overwrite_output_dir)
    print(report.table())
    left = report.of("not_converted") + report.of("unrecognized")
    print(f"\n{len(report.of('model'))} models, {sum(len(e.outputs) for e in report.of('dataset'))} datasets, "
          f"{len(report.of('dedup_map'))} dedup maps; {len(left)} files not converted (reasons above and in "
          f"{args.output_dir}/conversion_report.json)")
    if args.push_to_hub:
        for repo_id in push_zoo(args.output_dir, args.namespace, private=args.private):
            print(f"pushed {repo_id}")
    return report


if __name__ == "__main__":
    run_cli(main)
