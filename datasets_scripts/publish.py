"""Publish a dataset directory written by this package (both configs, Parquet + README card) to the Hub.

    python -m datasets_scripts.publish --dataset_dir fashioniq-hf --repo_id <user>/fashioniq-cir [--private]

The directory already has the Hub's layout (`corpus/*.parquet`, `triplets/*.parquet`, README with YAML
`configs:`), so it is uploaded as is and `load_dataset("<user>/fashioniq-cir", "triplets")` works afterwards.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from modeling_spn4cir.cli import add_debug_flag, run_cli
from modeling_spn4cir.storage import MARKER

LICENSE_NOTE = (
    "\n## License\n\nThe annotations keep their original licenses (see above); the images belong to their "
    "owners. Check both before redistributing.\n"
)


def check_layout(dataset_dir: str | Path) -> Path:
    """The directory must hold the two configs and a card declaring them."""
    dataset_dir = Path(dataset_dir)
    readme = dataset_dir / "README.md"
    if not readme.exists() or "configs:" not in readme.read_text():
        raise ValueError(f"{dataset_dir} has no README.md with `configs:`; write it with a datasets_scripts converter.")
    for config in ("corpus", "triplets"):
        if not list((dataset_dir / config).glob("*.parquet")):
            raise ValueError(f"{dataset_dir}/{config}/ has no Parquet shards.")
    return dataset_dir


def push_cir_dataset(dataset_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None, api=None):
    """Create the dataset repo if needed and upload the directory (adding a license note to the card)."""
    from huggingface_hub import HfApi

    dataset_dir = check_layout(dataset_dir)
    readme = dataset_dir / "README.md"
    if LICENSE_NOTE not in readme.read_text():
        readme.write_text(readme.read_text() + LICENSE_NOTE)
    api = api or HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    # the output marker (and a lock, if any) is local bookkeeping of `atomic_directory`, not part of the dataset
    return api.upload_folder(folder_path=str(dataset_dir), repo_id=repo_id, repo_type="dataset",
                             ignore_patterns=[MARKER, "*.lock"], commit_message="Upload CIR dataset (spn4cir schema)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--repo_id", required=True)
    parser.add_argument("--private", action="store_true")
    args = add_debug_flag(parser).parse_args(argv)
    print(push_cir_dataset(args.dataset_dir, args.repo_id, args.private))


if __name__ == "__main__":
    run_cli(main)
