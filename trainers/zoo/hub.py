"""The zoo and the Hub: downloading the authors' release, publishing the converted models and datasets."""

from __future__ import annotations

from pathlib import Path

from .paper import SOURCE_REPO


def snapshot(repo_id: str = SOURCE_REPO, local_dir: str | Path | None = None, revision: str | None = None) -> Path:
    """An existing copy of the release (`local_dir`), or `huggingface_hub.snapshot_download(repo_id)`."""
    if local_dir is not None:
        if not Path(local_dir).is_dir():
            raise FileNotFoundError(f"--local_dir {local_dir} is not a directory; pass a copy of {repo_id} (or leave "
                                    "it out to download one).")
        return Path(local_dir)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, revision=revision))


def push_zoo(output_dir: str | Path, namespace: str, api=None, private: bool = False,
             token: str | None = None) -> list[str]:
    """Create `namespace/<name>` for every model and dataset directory under `output_dir` and upload it; returns the
    repo ids. `api`: an `HfApi` (or anything with its `create_repo` and `upload_folder`)."""
    from huggingface_hub import HfApi

    from datasets_scripts.publish import push_cir_dataset

    output_dir = Path(output_dir)
    api = api or HfApi(token=token)
    repos = []
    for directory in sorted((output_dir / "models").glob("*/")):
        repo_id = f"{namespace}/{directory.name}"
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(directory), repo_id=repo_id, repo_type="model", ignore_patterns=[".*"],
                          commit_message=f"Convert {directory.name} from {SOURCE_REPO}")
        repos.append(repo_id)
    for directory in sorted((output_dir / "datasets").glob("*/")):
        repo_id = f"{namespace}/{directory.name}"
        push_cir_dataset(directory, repo_id, private=private, api=api)
        repos.append(repo_id)
    return repos


__all__ = ["push_zoo", "snapshot"]
