"""The recipe's resumability stamps: which of OUTPUT_DIR's outputs a run of the same config (or of the same inputs)
made, so that a rerun reuses them. Every stamp the recipe package reads or writes is here, in three forms:

- config stamps (`results.json`, `stage0.json`, the noise study's `point.json`): `{"config": config_key(cfg), ...}`;
- the benchmark's `recipe_manifest.json`: the manifest itself;
- the captioner's `captioner_manifest.json`: `{"manifest": ..., "summary": ...}`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from modeling_spn4cir.storage import atomic_write_json, json_sha256

STAGE0 = "stage0.json"  # stage 0 of this config is done (the noise study reuses it)
BENCHMARK = "recipe_manifest.json"
REPORTING = ("output_dir", "show_progress_bar")  # where a run is written and how it reports: no effect on models
DIAGNOSTIC_ONLY = ("editor_config",)  # settings of a diagnostic's own models (stamped by them), not the default's


def config_key(cfg) -> dict:
    """What determines a run's models (JSON types): the config without where it is written or how it reports, nor
    the settings only a diagnostic's own models read."""
    return json.loads(json.dumps({k: v for k, v in asdict(cfg).items() if k not in REPORTING + DIAGNOSTIC_ONLY}))


def finished(path: Path, cfg) -> dict | None:
    """The config stamp at `path` (a dict with `"config"`) if a run of the same config wrote it, else None."""
    if path.exists():
        stored = json.loads(path.read_text())
        if {k: v for k, v in stored["config"].items() if k not in REPORTING + DIAGNOSTIC_ONLY} == config_key(cfg):
            return stored
    return None


def stamp(path: Path, cfg, **content) -> None:
    """Write a config stamp: `{"config": config_key(cfg), **content}`."""
    atomic_write_json(path, {"config": config_key(cfg), **content}, indent=1)


def clear_stage_stamps(out: Path) -> None:
    """A new run rewrites the stages: the stamps of earlier ones no longer hold."""
    (out / STAGE0).unlink(missing_ok=True)


def benchmark_manifest(cfg) -> dict:
    return {"seed": cfg.seed, "size": cfg.size, "generator": "datasets_scripts.synthetic v1"}


def benchmark_is_current(path: Path, cfg) -> bool:
    """Whether the benchmark in `path` was built by the recipe for this seed and size."""
    stamp_path = path / BENCHMARK
    return stamp_path.exists() and json.loads(stamp_path.read_text()) == benchmark_manifest(cfg)


def stamp_benchmark(path: Path, cfg) -> None:
    atomic_write_json(path / BENCHMARK, benchmark_manifest(cfg))


def stored_summary(path: Path, manifest: dict) -> dict | None:
    """The summary stored at `path` with the same `manifest`, else None."""
    if path.exists():
        stored = json.loads(path.read_text())
        if stored["manifest"] == manifest:
            return stored["summary"]
    return None


def store_summary(path: Path, manifest: dict, summary: dict) -> None:
    atomic_write_json(path, {"manifest": manifest, "summary": summary}, indent=1)


def cache_name(manifest) -> str:
    """A short name for a cache directory keyed by `manifest` (any JSON-able value)."""
    return json_sha256(manifest)[:12]
