"""The approximate search backend of a gallery index: a FAISS index over the gallery's target embeddings (inner
products; single-vector `[N, D]` galleries of dot-product models), built once, saved beside the index and loaded
with it.

Two kinds (`FaissSettings.kind`):

- `"hnsw"`: an HNSW graph over the full vectors (`IndexHNSWFlat`, `hnsw_m` links per node, `ef_construction`);
  high recall, memory of the gallery itself plus the graph, slow to build (minutes for 1M vectors);
- `"ivfpq"`: an inverted file of `nlist` k-means cells whose vectors are product-quantized into `m` codes of
  `nbits` bits (`IndexIVFPQ`): `m` bytes per image at `nbits=8`, so 100M images of width 256 fit in 3.2 GB; built
  in seconds to minutes; a search visits `nprobe` cells. This is what FAISS users reach for past 1M images.

Either way the search returns candidates (`refine` times `k`, plus one per excluded reference) whose scores are
then recomputed exactly from the stored embeddings (a CIR index holds them anyway), so that the returned scores are
the model's similarity (those of the exact backend for the same images) and the order is exact among the candidates:
the approximation can only miss images, never misorder or misscore them.

On disk (in the index directory, `CIRIndex.save`): `faiss.index` (FAISS's own serialization) and `faiss.json` (the
settings, the FAISS version, the index's rows and width, the digest of the embeddings it was built from, the file's
size and sha256). A FAISS index whose embeddings digest, settings or file does not match is stale: it is not loaded,
and the next FAISS search rebuilds it with the recorded settings.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..storage import (
    atomic_write_bytes,
    atomic_write_json,
    file_sha256,
    file_stat,
    output_lock,
    sha256,
)

logger = logging.getLogger(__name__)

FAISS_FILE = "faiss.index"
FAISS_MANIFEST = "faiss.json"
FAISS_FORMAT = "spn4cir-faiss/1"
KINDS = ("hnsw", "ivfpq")
PQ_POINTS_PER_CODE = 64


def import_faiss():
    try:
        import faiss
    except ImportError as error:
        raise ImportError("backend='faiss' needs faiss: pip install 'spn4cir[faiss]' (faiss-cpu).") from error
    return faiss


@dataclass(frozen=True)
class FaissSettings:
    """
    How the FAISS index is built (saved with it) and searched by default.

    Args:
        kind: `"hnsw"` or `"ivfpq"` (see the module docstring).
        hnsw_m, ef_construction: HNSW's links per node and build-time beam; `ef_search`: its search beam (default
            `max(128, 2 * k)` per search).
        nlist: IVF cells (0: `4 * sqrt(N)` rounded to a power of two, at least 16, at most N / 39, FAISS's minimum
            of 39 training points per cell); nprobe: cells visited per search.
        m, nbits: PQ codes per vector and bits per code (m=0: `D / 8`, i.e. 8 dimensions per code; D % m == 0).
        train_size: vectors the IVF and PQ quantizers are trained on (0: `min(N, 64 * nlist)`), drawn with `seed`.
        refine: candidates fetched per result, then re-scored exactly (0: 50 for IVF-PQ, whose codes rank the
            neighbours of a query coarsely — on `benchmarks.bench_index`'s 1M gallery 10 per result find 60% of the
            exact top 10, 50 find 96%, 200 all; 1 for HNSW, which holds the vectors themselves).
    """

    kind: str = "hnsw"
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 0
    nlist: int = 0
    nprobe: int = 16
    m: int = 0
    nbits: int = 8
    train_size: int = 0
    refine: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"FAISS index kind must be one of {KINDS}, got {self.kind!r}.")
        for name in ("hnsw_m", "ef_construction", "nprobe", "nbits"):
            if getattr(self, name) < 1:
                raise ValueError(f"FaissSettings.{name} must be at least 1, got {getattr(self, name)}.")

    def resolved(self, n: int, dim: int) -> FaissSettings:
        """These settings with the automatic values (`nlist`, `m`, `train_size` = 0) worked out for `n` vectors of
        width `dim`; an error naming the option where they cannot work."""
        if self.refine < 0:
            raise ValueError(f"FaissSettings.refine must be 0 (automatic) or more, got {self.refine}.")
        if self.kind != "ivfpq":
            return replace(self, refine=self.refine or 1)
        nlist = self.nlist or min(max(16, 2 ** round(math.log2(4 * math.sqrt(max(n, 1))))), max(1, n // 39))
        m = self.m or (dim // 8 if dim % 8 == 0 else 0)
        if m == 0 or dim % m:
            raise ValueError(f"IVF-PQ splits each vector into m codes: the width {dim} must be a multiple of m "
                             f"(got m={self.m or 'auto'}); pass --m (FaissSettings.m) dividing {dim}.")
        if nlist > n:
            raise ValueError(f"IVF-PQ with nlist={nlist} cells needs at least that many images; the gallery has {n}: "
                             "pass a smaller --nlist, or use --faiss hnsw for small galleries.")
        train = min(n, self.train_size or max(64 * nlist, 39 * 2**self.nbits))
        if train < max(nlist, 2**self.nbits):
            raise ValueError(f"IVF-PQ trains {nlist} cells and {2 ** self.nbits} codes per sub-vector on {train} "
                             f"images, too few: pass a larger --train_size, a smaller --nlist or --nbits, or use "
                             "--faiss hnsw for small galleries.")
        return replace(self, nlist=nlist, m=m, train_size=train, refine=self.refine or 50)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> FaissSettings:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


class FaissIndex:
    """A built FAISS index over `[N, D]` embeddings with the settings it was built with (`resolved`)."""

    def __init__(self, index, settings: FaissSettings):
        self.index, self.settings = index, settings

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def __repr__(self) -> str:
        s = self.settings
        what = (f"HNSW{s.hnsw_m}" if s.kind == "hnsw" else
                f"IVF{s.nlist},PQ{s.m}x{s.nbits} (nprobe {min(s.nprobe, s.nlist)})")
        return f"FaissIndex({what}, {len(self)} vectors)"

    @classmethod
    def build(cls, embeddings: torch.Tensor, settings: FaissSettings) -> FaissIndex:
        faiss = import_faiss()
        _check_single_vector(embeddings)
        n, dim = embeddings.shape
        settings = settings.resolved(n, dim)
        data = embeddings.float().cpu().contiguous().numpy()
        if settings.kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = settings.ef_construction
        else:
            index = faiss.index_factory(dim, f"IVF{settings.nlist},PQ{settings.m}x{settings.nbits}",
                                        faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = index.pq.cp.seed = settings.seed  # k-means of the cells and of the codes
            index.do_polysemous_training = False  # for Hamming-filtered search, which is not used: 40x the time
            # FAISS trains each code book on up to 256 points per code (65k): minutes on a few cores for 8-dim
            # sub-vectors; 64 per code (16k points) trains 4x faster, and re-scoring absorbs the coarser codes.
            index.pq.cp.max_points_per_centroid = PQ_POINTS_PER_CODE
            g = torch.Generator().manual_seed(settings.seed)
            sample = torch.randperm(n, generator=g)[: settings.train_size].sort().values.numpy()
            index.train(data[sample])
        index.add(data)
        return cls(index, settings)

    def add(self, embeddings: torch.Tensor) -> None:
        """Append rows (new gallery images, in order); the trained quantizers are kept."""
        _check_single_vector(embeddings)
        self.index.add(embeddings.float().cpu().contiguous().numpy())

    def candidates(self, queries: torch.Tensor, count: int, nprobe: int | None = None,
                   ef_search: int | None = None) -> torch.Tensor:
        """`[B, count]` candidate rows per query (-1 where FAISS found fewer), by FAISS's approximate score."""
        s = self.settings
        if s.kind == "hnsw":
            self.index.hnsw.efSearch = max(ef_search or s.ef_search or 128, 2 * count)
        else:
            self.index.nprobe = min(nprobe or s.nprobe, s.nlist)
        _, indices = self.index.search(queries.float().cpu().contiguous().numpy(), min(count, len(self)))
        return torch.from_numpy(indices).long()

    # ------------------------------------------------------------------------------------------ on disk
    def save(self, directory: str | Path, embeddings_digest: str) -> None:
        """Write `faiss.index` and then `faiss.json` into `directory` (each atomically)."""
        faiss = import_faiss()
        data = memoryview(faiss.serialize_index(self.index))
        path = atomic_write_bytes(Path(directory) / FAISS_FILE, data)
        atomic_write_json(Path(directory) / FAISS_MANIFEST, {
            "format": FAISS_FORMAT, "settings": self.settings.to_json(), "faiss_version": faiss.__version__,
            "rows": len(self), "dim": int(self.index.d), "embeddings": embeddings_digest, "file": FAISS_FILE,
            "bytes": len(data), "sha256": sha256(data), "stat": file_stat(path)}, indent=1)

    @classmethod
    def load(cls, directory: str | Path, embeddings_digest: str, rows: int,
             dim: int) -> tuple[FaissIndex | None, FaissSettings | None]:
        """(the FAISS index saved in `directory`, its settings); (None, the settings to rebuild it with) when it is
        stale or damaged (logged, naming why); (None, None) when there is none. The file is hashed only when its
        stamp is not the one written (the project's one staleness rule)."""
        directory = Path(directory)
        manifest_file, path = directory / FAISS_MANIFEST, directory / FAISS_FILE
        if not manifest_file.is_file():
            return None, None
        try:
            manifest = json.loads(manifest_file.read_text())
            settings = FaissSettings.from_json(manifest["settings"])
        except (ValueError, KeyError, TypeError) as error:
            logger.warning("Ignoring %s (%s); a FAISS search builds a new HNSW index.", manifest_file, error)
            return None, None
        why = _stale(manifest, embeddings_digest, rows, dim)
        if why is None and not path.is_file():
            why = f"{FAISS_FILE} is missing"
        elif why is None and file_stat(path) != manifest.get("stat") and (
                path.stat().st_size != manifest.get("bytes") or file_sha256(path) != manifest.get("sha256")):
            why = f"{FAISS_FILE} is not the file {FAISS_MANIFEST} describes"
        if why is not None:
            logger.warning("The FAISS index in %s is stale (%s); the next FAISS search rebuilds it (%s).", directory,
                           why, settings.kind)
            return None, settings
        try:
            faiss = import_faiss()
        except ImportError:
            logger.warning("%s holds a FAISS index, but faiss is not installed: only backend='exact' searches it "
                           "(pip install 'spn4cir[faiss]').", directory)
            return None, None
        return cls(faiss.read_index(str(path)), settings), settings


def _stale(manifest: dict, embeddings_digest: str, rows: int, dim: int) -> str | None:
    if manifest.get("format") != FAISS_FORMAT:
        return f"format {manifest.get('format')!r}, this code reads {FAISS_FORMAT!r}"
    if manifest.get("embeddings") != embeddings_digest:
        return "it was built from other embeddings than the index holds"
    if (manifest.get("rows"), manifest.get("dim")) != (rows, dim):
        return f"it holds {manifest.get('rows')} vectors of width {manifest.get('dim')}, the index {rows} x {dim}"
    return None


def _check_single_vector(embeddings: torch.Tensor) -> None:
    if embeddings.ndim != 2:
        raise ValueError("backend='faiss' searches single-vector [N, D] galleries; this one is "
                         f"{tuple(embeddings.shape)} (multi-vector targets): use backend='exact'.")


def faiss_topk(faiss_index: FaissIndex, embeddings: torch.Tensor, queries: torch.Tensor, k: int,
               excluded: torch.Tensor | None = None, nprobe: int | None = None, ef_search: int | None = None,
               refine: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k rows of each query `[B, D]` from the FAISS candidates (`refine` per result, default the settings')
    re-scored exactly (dot products with `embeddings` `[N, D]`, ties to the row listed first); `excluded` `[B]`: a
    row left out per query (-1: none). Returns `(indices, scores)` `[B, k]` (-1 and NaN where fewer than k
    candidates remain)."""
    extra = 0 if excluded is None else 1
    count = k * max(refine or faiss_index.settings.refine, 1) + extra
    candidates = faiss_index.candidates(queries, count, nprobe, ef_search)
    found = candidates >= 0
    if excluded is not None:
        found &= candidates != excluded[:, None].to(candidates.device)
    rows = candidates.clamp(min=0)
    gathered = embeddings[rows.flatten()].view(*rows.shape, -1).float()
    scores = torch.einsum("bd,bcd->bc", queries.float().to(gathered.device), gathered).cpu()
    scores[~found] = float("-inf")
    # Exact order among the candidates: by score, ties to the lower row (as the exact ranker).
    by_row = rows.sort(dim=1)
    scores, rows, found = scores.gather(1, by_row.indices), by_row.values, found.gather(1, by_row.indices)
    order = torch.sort(-scores, dim=1, stable=True).indices[:, :k]
    indices, scores, found = rows.gather(1, order), scores.gather(1, order), found.gather(1, order)
    indices[~found], scores[~found] = -1, float("nan")
    return indices, scores


class FaissBacked:
    """The FAISS side of a gallery index (`CIRIndex` inherits it): the FAISS index built, loaded with the gallery
    index or rebuilt when stale, searched, and saved beside the gallery index. The host class holds `embeddings`
    `[N, D]` and calls `_init_faiss()` in its constructor."""

    def _init_faiss(self) -> None:
        self._faiss: FaissIndex | None = None
        self._faiss_settings: FaissSettings | None = None  # kept while a stale FAISS index waits to be rebuilt
        self._digest: str | None = None  # `embeddings_digest` of the saved index these embeddings are

    def _load_faiss(self, path: str | Path, digest: str) -> None:
        """Take the FAISS index saved in the index directory `path` when it was built from embeddings of `digest`
        (a stale one leaves only its settings, for the rebuild)."""
        self._digest = digest
        if self.embeddings.ndim == 2:
            self._faiss, self._faiss_settings = FaissIndex.load(path, digest, *self.embeddings.shape)

    def _faiss_topk(self, queries, k, excluded, **search):
        return faiss_topk(self.faiss_index(), self.embeddings, queries, k, excluded, **search)

    def build_faiss(self, settings: FaissSettings | None = None, **kwargs) -> FaissIndex:
        """Build (and hold, so that [`save`] writes it) the FAISS index of `backend="faiss"`: `settings`, or
        `FaissSettings(**kwargs)` (e.g. `kind="ivfpq", nlist=4096, m=32, nprobe=16`; default an HNSW graph)."""
        import time

        settings = settings or FaissSettings(**kwargs)
        start = time.perf_counter()
        self._faiss = FaissIndex.build(self.embeddings, settings)
        self._faiss_settings = self._faiss.settings
        logger.info("Built %r in %.1f s.", self._faiss, time.perf_counter() - start)
        return self._faiss

    def has_faiss(self) -> bool:
        """Whether a FAISS index is built or loaded (else a FAISS search builds one first)."""
        return self._faiss is not None

    def faiss_index(self) -> FaissIndex:
        """The FAISS index: the one built or loaded, else built now (with the settings of a stale saved one)."""
        return self._faiss if self._faiss is not None else self.build_faiss(self._faiss_settings)

    def save_faiss(self, path: str | os.PathLike) -> Path:
        """Write the FAISS index into the index directory `path` this index was loaded from or saved to (e.g. after a
        stale one was rebuilt by a search), leaving its other files as they are."""
        from .index_storage import embeddings_digest, read_index

        with output_lock(path):
            if self._digest is None or embeddings_digest(read_index(path, meta_only=True)) != self._digest:
                raise ValueError(f"{path} does not hold this index's embeddings; save the whole index there with "
                                 "index.save(path, overwrite=True).")
            self.faiss_index().save(path, self._digest)
        return Path(path)


__all__ = ["FAISS_FILE", "FaissBacked", "FAISS_MANIFEST", "FaissIndex", "FaissSettings", "faiss_topk", "import_faiss"]
