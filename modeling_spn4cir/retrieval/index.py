"""`CIRIndex`: a gallery of images encoded once by a CIR model's target side, searched with composed queries.

    index = CIRIndex.build(model, processor.image_processor, "my_images/")      # a folder, a list of paths, or a
    index.save("my_images.idx")                                                 #   corpus (`image_id`, `image`)
    index = CIRIndex.load("my_images.idx")
    hits = index.search(query_embeds, top_k=10, similarity=model.similarity)   # [[{"image_id", "score", "path"}]]

On disk an index is a directory of safetensors shards of the target embeddings (`[N, D]` or `[N, Q, D]`) with
their manifests, and `index.json` (image ids, file paths, where the images came from, the shard list and the
fingerprint of the model side that produced the embeddings): see `index_storage`. The fingerprint is the project's
one target-side fingerprint (`modeling_spn4cir.storage.target_side_fingerprint`: the weights outside
`query_side_parameters()` and the image preprocessing), so an SPN stage-2 model (whose target side is frozen)
reuses the index of its stage-1 model, while any other model is refused with an error naming both fingerprints.

Images are encoded with the project's one image-encoding loop (`modeling_spn4cir.image_store.encode_images`; with
`cache_dir`, in resumable shards) and ranked with its one exact top-k ranker (`ranking.rank_topk`, ties to the
image listed first), whose scores are those of the ranked images. A query's reference is left out of its own
results when it is in the gallery (`references_in_gallery`: by id, or by content for an image), as the evaluation
protocols do. An optional FAISS backend (`faiss_backend`: HNSW or IVF-PQ, `pip install .[faiss]`, inner-product
models only), saved and loaded with the index, trades exactness for speed on galleries of millions of images.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..image_files import open_image
from ..image_store import ImageStore, encode_images
from ..storage import atomic_directory, check_output_dir, same_target_side, target_side_fingerprint
from .faiss_backend import FaissBacked
from .gallery_images import DATASET_KEYS, gallery_images
from .index_storage import (
    BUILD_SHARD_SIZE,
    REBUILD,
    IndexFileError,
    embeddings_digest,
    encode_with_cache,
    nonfinite_rows,
    read_index,
    write_index,
)
from .ranking import rank_topk
from .references import references_in_gallery

logger = logging.getLogger(__name__)

# Scores held at once by an exact search: query chunk x gallery size (128 MiB of float32).
SCORE_BUDGET = 2**25
OUTPUT_TOOL = "CIRIndex"  # the marker of a saved index's directory (`storage.atomic_directory`)


class ModelMismatchError(ValueError):
    """The index was built by another model (target side or image preprocessing) than the one querying it."""


def model_fingerprint(model, image_processor) -> dict:
    """An index's fingerprint: the target-side fingerprint (the model class, the target side's weights and dtypes,
    the image preprocessing: `modeling_spn4cir.storage.target_side_fingerprint`, the one the candidate bank and the
    evaluator compare), and `model`, the model's name or path, for messages and for loading it again."""
    fingerprint = target_side_fingerprint(model, image_processor)
    fingerprint["model"] = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or "?"
    return fingerprint


def describe_fingerprint(fingerprint: dict) -> str:
    return (f"{fingerprint.get('model_class')} '{fingerprint.get('model') or '?'}' (target side "
            f"{fingerprint.get('target_side_weights', '?')[:12]}, image processor "
            f"{fingerprint.get('image_processor', '?')[:12]})")


class CIRIndex(FaissBacked):
    """
    Target embeddings of a gallery, with their image ids, file paths and the model fingerprint.

    Args:
        embeddings: `[N, D]` or `[N, Q, D]` target embeddings (`model.get_target_embeds`), rows in `image_ids` order.
        image_ids: one unique string id per row.
        paths: the image file of each row, or None where the image lives only inside a dataset.
        fingerprint: [`model_fingerprint`] of the model and image processor that produced `embeddings`.
        sources: where the images came from (folders, file lists, corpora), in the order they were added, each with
            the folder its files lie in (`root`: only files under it are served by [`open_image`]). Default: one
            source of the given files, rooted at their common folder.
    """

    def __init__(self, embeddings: torch.Tensor, image_ids: Sequence[str], paths: Sequence[str | None],
                 fingerprint: dict, sources: Sequence[dict] | None = None):
        image_ids, paths = list(image_ids), list(paths)
        if embeddings.shape[0] != len(image_ids) or len(paths) != len(image_ids):
            raise ValueError(f"{embeddings.shape[0]} embeddings, {len(image_ids)} ids and {len(paths)} paths; "
                             "they must describe the same rows.")
        _check_embeddings(embeddings)
        if sources is None:
            folders = [os.path.dirname(os.path.abspath(p)) for p in paths if p is not None]
            sources = [{"type": "files", "root": os.path.commonpath(folders), "start": 0, "stop": len(paths)}] \
                if folders else []
        duplicates = [i for i, n in _counts(image_ids).items() if n > 1]
        if duplicates:
            raise ValueError(f"{len(duplicates)} image ids occur more than once in the gallery (first: "
                             f"{duplicates[:5]}); image ids must be unique.")
        self.embeddings, self.image_ids, self.paths = embeddings, image_ids, paths
        self.fingerprint, self.sources = dict(fingerprint), list(sources)
        self._position = {image_id: i for i, image_id in enumerate(image_ids)}
        self._init_faiss()
        self._stores: dict[str, ImageStore] = {}

    def __len__(self) -> int:
        return len(self.image_ids)

    def __contains__(self, image_id) -> bool:
        return image_id in self._position

    def __repr__(self) -> str:
        return (f"CIRIndex({len(self)} images, embeddings {tuple(self.embeddings.shape)} {self.embeddings.dtype}, "
                f"model {describe_fingerprint(self.fingerprint)})")

    # ------------------------------------------------------------------------------------------- building
    @staticmethod
    def _encode(model, image_processor, images, ids, dataset, cache_dir, shard_size, skip_bad_images, **encoding):
        """Encode the gallery `images` with `model.get_target_embeds` -> (embeddings `[n, ...]`, ids, paths,
        source); with `cache_dir`, in the resumable shards of a build cache (`index_storage.encode_with_cache`)."""
        gallery = gallery_images(images, ids, dataset, skip_bad_images)
        if encoding.get("device") is None:
            encoding["device"] = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            if cache_dir is None:
                embeddings = encode_images(model.get_target_embeds, gallery.store, gallery.ids, image_processor,
                                           desc="gallery", **encoding)
            else:
                embeddings = encode_with_cache(model.get_target_embeds, gallery.store, gallery.ids, image_processor,
                                               target_side_fingerprint(model, image_processor), cache_dir,
                                               shard_size, desc="gallery", **encoding)
        finally:
            model.train(was_training)
        return embeddings, gallery.ids, gallery.paths, gallery.source

    @classmethod
    def build(cls, model, image_processor, images, ids: Sequence[str] | None = None, dataset: dict | None = None,
              batch_size: int = 64, num_workers: int = 0, device=None, dtype: torch.dtype = torch.float32,
              show_progress_bar: bool = True, cache_dir: str | os.PathLike | None = None,
              shard_size: int = BUILD_SHARD_SIZE, skip_bad_images: bool = False) -> "CIRIndex":
        """
        Encode a gallery with `model.get_target_embeds`.

        Args:
            model: any CIR contract model.
            image_processor: the model's image processor (`processor.image_processor`).
            images: a folder (every image under it, ids = paths relative to it), a list of image files (ids = the
                paths as given, or `ids`), or a `datasets.Dataset` corpus with `image_id` and `image`.
            dataset: for a corpus, how to load it again (`{"path": dir or Hub id, "name": "corpus", "split": ...}`,
                the arguments of `datasets.load_dataset`), so that `open_image` finds images stored inside it.
            batch_size, num_workers: encoding batch and DataLoader workers (decoding and preprocessing).
            device: where the model runs (default: where its parameters are).
            dtype: storage dtype of the embeddings (`torch.float16` halves the index).
            cache_dir: a directory where the embeddings are built in shards of `shard_size` images, so that a
                killed build of a large gallery resumes where it stopped (the images are hashed once to fingerprint
                the shards); delete it once the index is saved. Under `torch.distributed` every rank must call
                `build` with it: the shards are split over the ranks. None: encode in memory.
            skip_bad_images: check every image first and leave out those that cannot be used (broken links,
                unreadable, truncated or undecodable files, decompression bombs), listed in the source's
                `bad_images`; without it the first such image is an error naming it (folders: every hidden
                folder and file is skipped, counted in the source).
        """
        embeddings, ids, paths, source = cls._encode(
            model, image_processor, images, ids, dataset, cache_dir, shard_size, skip_bad_images, batch_size=batch_size,
            num_workers=num_workers, device=device, dtype=dtype, show_progress_bar=show_progress_bar)
        source |= {"start": 0, "stop": len(ids)}
        return cls(embeddings, ids, paths, model_fingerprint(model, image_processor), [source])

    def add(self, model, image_processor, images, ids: Sequence[str] | None = None, dataset: dict | None = None,
            batch_size: int = 64, num_workers: int = 0, device=None, show_progress_bar: bool = True,
            cache_dir: str | os.PathLike | None = None, shard_size: int = BUILD_SHARD_SIZE,
            skip_bad_images: bool = False) -> "CIRIndex":
        """Encode more images (as [`build`]) with the same model and append them; ids must be new. Returns `self`."""
        self.check_model(model, image_processor)
        embeddings, ids, paths, source = self._encode(
            model, image_processor, images, ids, dataset, cache_dir, shard_size, skip_bad_images, batch_size=batch_size,
            num_workers=num_workers, device=device, dtype=self.embeddings.dtype, show_progress_bar=show_progress_bar)
        source |= {"start": len(self), "stop": len(self) + len(ids)}
        clash = [i for i in ids if i in self._position]
        if clash:
            raise ValueError(f"{len(clash)} images are already in the index (first: {clash[:5]}); ids must be new.")
        if embeddings.shape[1:] != self.embeddings.shape[1:]:
            raise ValueError(f"new embeddings have rows of shape {tuple(embeddings.shape[1:])}, the index "
                             f"{tuple(self.embeddings.shape[1:])}.")
        merged = CIRIndex(torch.cat([self.embeddings, embeddings]), self.image_ids + ids,
                          self.paths + paths, self.fingerprint, self.sources + [source])
        faiss_index, settings = self._faiss, self._faiss_settings
        self.__dict__.update(merged.__dict__)
        if faiss_index is not None:  # new rows go into the trained FAISS index
            faiss_index.add(embeddings)
        self._faiss, self._faiss_settings = faiss_index, settings
        return self

    # ------------------------------------------------------------------------------------------ checking
    def check_model(self, model, image_processor) -> None:
        """Raise [`ModelMismatchError`] unless `model` and `image_processor` are what built this index."""
        if not same_target_side(self.fingerprint, model, image_processor):
            theirs = model_fingerprint(model, image_processor)
            raise ModelMismatchError(
                f"This gallery index was built by {describe_fingerprint(self.fingerprint)}, but it is being used with "
                f"{describe_fingerprint(theirs)}: their embeddings are not comparable. Rebuild the index with this "
                "model (`python examples/retrieve.py index --model ...`) or query it with the model that built it."
            )

    # ------------------------------------------------------------------------------------------ searching
    def topk(self, query_embeds: torch.Tensor, k: int, similarity=None, backend: str = "exact",
             exclude: Sequence[str | None] | None = None, **faiss_search) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Top-k gallery rows of each query.

        Args:
            query_embeds: `[B, D]` composed queries (`model.get_query_embeds`).
            k: how many results per query (at most the gallery size).
            similarity: the model's scoring rule, `model.similarity` (default: dot product; required for
                multi-vector `[N, Q, D]` galleries).
            backend: `"exact"` (chunked exact ranking, ties to the image listed first) or `"faiss"` (the index's
                FAISS index, [`build_faiss`], by default an HNSW graph built on first use; approximate candidates
                re-scored exactly; single-vector galleries of dot-product models only).
            exclude: per query, an image id to leave out of its ranking (e.g. the reference image), or None.
            faiss_search: `nprobe=` (IVF-PQ), `ef_search=` (HNSW) or `refine=` (candidates re-scored per result)
                for this search, instead of the saved settings.

        Returns:
            `(indices, scores)`, both `[B, k]` on the CPU, best first; the scores are `similarity` of each query with
            its ranked rows, from the ranking's own pass (exact) or re-scored from the stored embeddings (FAISS).
        """
        if self.embeddings.ndim == 3 and similarity is None:
            raise ValueError("This gallery holds multi-vector targets [N, Q, D]: pass similarity=model.similarity.")
        self._check_queries(query_embeds, k)
        queries = query_embeds.to(self.embeddings.device)
        if similarity is None:
            queries = queries.to(self.embeddings.dtype)
        excluded = None
        if exclude is not None:
            if len(exclude) != queries.shape[0]:
                raise ValueError(f"{len(exclude)} excluded ids for {queries.shape[0]} queries; pass one id (or None) "
                                 "per query.")
            if any(e is not None for e in exclude):
                missing = [e for e in exclude if e is not None and e not in self._position]
                if missing:
                    raise KeyError(f"excluded images {missing[:5]} are not in the index; exclude only its images "
                                   "(`index.image_ids`).")
                # An out-of-range index never matches a row: -1 would wrap, so use a row we then ignore.
                excluded = torch.tensor([self._position[e] if e is not None else -1 for e in exclude])
        if backend == "faiss":
            return self._faiss_topk(queries, k, excluded, **faiss_search)
        if backend != "exact":
            raise ValueError(f"backend must be 'exact' or 'faiss', got {backend!r}.")
        chunk = max(1, min(512, SCORE_BUDGET // max(len(self), 1)))
        if excluded is not None and (excluded < 0).any():
            return self._topk_mixed_exclusion(queries, k, similarity, excluded, chunk)
        ranked = rank_topk(queries, self.embeddings, k, similarity=similarity, exclude=excluded, chunk_size=chunk)
        return ranked.indices, ranked.scores

    def _check_queries(self, query_embeds: torch.Tensor, k) -> None:
        """A ranking needs k >= 1 and finite `[B, D]` queries of the gallery's width: anything else is an error
        saying which (never an empty or NaN ranking)."""
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"top_k must be a whole number of results of at least 1, got {k!r}.")
        if len(self) == 0:
            raise ValueError("The gallery index holds no images: there is nothing to rank. Add images to it "
                             "(`index.add(...)`, `retrieve.py index --add`).")
        if query_embeds.ndim != 2:
            raise ValueError(f"queries must be [B, D] embeddings (model.get_query_embeds), got shape "
                             f"{tuple(query_embeds.shape)}.")
        if query_embeds.shape[-1] != self.embeddings.shape[-1]:
            raise ValueError(
                f"the queries have width {query_embeds.shape[-1]}, the gallery's embeddings width "
                f"{self.embeddings.shape[-1]}: they come from different models. Query the index with the model that "
                f"built it ({describe_fingerprint(self.fingerprint)}), or rebuild the index with this model.")
        bad = nonfinite_rows(query_embeds.detach())
        if bad:
            raise ValueError(f"{len(bad)} of {query_embeds.shape[0]} query embeddings hold NaN or inf (first: query "
                             f"{bad[0]}): they cannot be ranked. The model produced non-finite outputs: check its "
                             "weights (a diverged checkpoint, fp16 overflow) and the query's image and text.")

    def _topk_mixed_exclusion(self, queries, k, similarity, excluded, chunk):
        """Some queries exclude an image and some do not: rank the two groups separately (a query that excludes
        one has one result less when `k` is the gallery size: padded with index -1 and score NaN)."""
        k = min(k, len(self))
        indices = torch.full((queries.shape[0], k), -1, dtype=torch.long)
        scores = torch.full((queries.shape[0], k), float("nan"))
        for rows, exclude in ((excluded < 0, None), (excluded >= 0, excluded[excluded >= 0])):
            if rows.any():
                got = rank_topk(queries[rows], self.embeddings, k, similarity=similarity, exclude=exclude,
                                chunk_size=chunk)
                indices[rows, : got.indices.shape[1]] = got.indices
                scores[rows, : got.scores.shape[1]] = got.scores
        return indices, scores

    def hits(self, indices: torch.Tensor, scores: torch.Tensor) -> list[list[dict]]:
        """`[B, k]` indices and scores -> per query `[{"image_id", "score", "path"}, ...]`, best first; `path` is
        where the image lives ([`location`])."""
        return [[{"image_id": self.image_ids[i], "score": float(s), "path": self.location(i)}
                 for i, s in zip(row.tolist(), score_row.tolist()) if i >= 0]
                for row, score_row in zip(indices, scores)]

    def search(self, query_embeds: torch.Tensor, top_k: int = 10, similarity=None, backend: str = "exact",
               exclude: Sequence[str | None] | None = None, reference_ids: Sequence[str | None] | None = None,
               reference_embeds: torch.Tensor | None = None, keep_reference: bool = False,
               **faiss_search) -> list[list[dict]]:
        """[`topk`] as `[{"image_id", "score", "path"}, ...]` per query. With the queries' references
        (`reference_ids`: gallery ids; `reference_embeds`: their target embeddings `[B, ...]`, matched by content),
        each reference found in the gallery is left out of its own results ([`references_in_gallery`]) unless
        `keep_reference`."""
        if not keep_reference and (reference_ids is not None or reference_embeds is not None):
            if exclude is not None:
                raise ValueError("Pass either exclude= or the references (reference_ids= / reference_embeds=), "
                                 "not both: a query leaves out one image.")
            exclude = self.references_in_gallery(reference_ids, reference_embeds, backend)
        return self.hits(*self.topk(query_embeds, top_k, similarity, backend, exclude, **faiss_search))

    def references_in_gallery(self, reference_ids: Sequence[str | None] | None = None,
                              reference_embeds: torch.Tensor | None = None,
                              backend: str = "exact") -> list[str | None]:
        """Per query, the gallery id of its reference, or None when it is not in the gallery: a `reference_ids`
        entry (which must be a gallery id) where given, else the gallery image with the same target embedding as
        its row of `reference_embeds` (`references.references_in_gallery`; with `backend="faiss"` among the FAISS
        index's candidates, so that a large gallery is not scanned)."""
        return references_in_gallery(self, reference_ids, reference_embeds, backend)

    def location(self, i: int) -> str:
        """Where the image of row `i` lives: its file, or `"<dataset>:<split>:<image_id>"` for an image stored
        inside the dataset it was indexed from (`"<in-memory corpus>:<image_id>"` when the index does not know how
        to load that corpus)."""
        if self.paths[i] is not None:
            return self.paths[i]
        dataset = next((s for s in self.sources if s.get("start", 0) <= i < s.get("stop", len(self))),
                       {}).get("dataset") or {}
        where = f"{dataset['path']}:{dataset.get('split') or ''}" if dataset.get("path") else "<in-memory corpus>"
        return f"{where}:{self.image_ids[i]}"

    def to(self, device) -> "CIRIndex":
        """Move the embeddings (e.g. to the GPU the model runs on, so that queries are scored there)."""
        self.embeddings = self.embeddings.to(device)
        return self

    def open_image(self, image_id: str):
        """The PIL RGB image of `image_id` (decoded by the project's one image rule, `image_files.open_image`, as it
        was encoded): from its file, which must lie under its source's folder (`root`; an index serves only its
        gallery's images), or from the corpus it was encoded from when the index knows how to load that corpus
        (`dataset=` of [`build`])."""
        if image_id not in self._position:
            raise KeyError(f"image {image_id!r} is not in the index of {len(self)} images (`index.image_ids`).")
        i = self._position[image_id]
        source = next((s for s in self.sources if s.get("start", 0) <= i < s.get("stop", len(self))), {})
        if self.paths[i] is not None:
            return open_image(self._served_path(image_id, self.paths[i], source), name=f"{image_id!r} "
                              f"({self.paths[i]})")
        if not source.get("dataset"):
            raise FileNotFoundError(f"The index does not know where image {image_id!r} is stored (it was encoded from "
                                    "an in-memory corpus); build it with dataset={'path', 'name', 'split'}.")
        spec = source["dataset"]
        if not isinstance(spec, dict) or not set(spec) <= DATASET_KEYS:
            # an edited index.json must not pass other arguments to load_dataset (cache_dir, data_files, ...)
            raise IndexFileError(f"The index says image {image_id!r} is stored in the dataset {spec!r}, which is not "
                                 f"a dataset reference an index writes (keys {sorted(DATASET_KEYS)}); {REBUILD}.")
        key = json.dumps(spec, sort_keys=True)
        if key not in self._stores:
            import datasets

            self._stores[key] = ImageStore(datasets.load_dataset(**source["dataset"]))
        return self._stores[key].images([image_id])[0]

    @staticmethod
    def _served_path(image_id: str, path: str, source: dict) -> str:
        """`path`, if it lies under the folder its source records; else an `IndexFileError` (an edited or damaged
        `index.json` must not make a page or the demo show other files of the host)."""
        root = source.get("root")
        if not isinstance(root, str):
            raise IndexFileError(f"The index does not record the folder image {image_id!r} lies in (no 'root' in its "
                                 f"source: an index of an earlier version, or an edited index.json), so it does not "
                                 f"serve {path}; {REBUILD}.")
        root, served = os.path.abspath(root), os.path.abspath(path)
        if os.path.commonpath([root, served]) != root:
            raise IndexFileError(f"Image {image_id!r} is listed at {path}, outside its gallery folder {root}: an index "
                                 f"serves only the images under its gallery (its index.json was edited or damaged); "
                                 f"{REBUILD}.")
        return served

    # ------------------------------------------------------------------------------------------ saving
    @staticmethod
    def check_output(path: str | os.PathLike, overwrite: bool = False, protect=()) -> None:
        """Raise `storage.OutputDirError` unless [`save`] may write `path` (to refuse before encoding a gallery)."""
        check_output_dir(path, OUTPUT_TOOL, overwrite, protect)

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the index into the directory `path` (`index_storage`: embeddings shards with their manifests and
        `index.json`, and the FAISS index when one is built or configured: `faiss_backend`), atomically. `path` must
        be new, empty, or (with `overwrite`, e.g. after [`add`]) a previously saved index; never other files."""
        with atomic_directory(path, tool=OUTPUT_TOOL, overwrite=overwrite, protect=self._image_roots()) as staging:
            meta = write_index(staging, self.embeddings, self.image_ids, self.paths, self.fingerprint, self.sources)
            self._digest = embeddings_digest(meta)
            if self._faiss is not None or self._faiss_settings is not None:
                self.faiss_index().save(staging, self._digest)
        return Path(path)

    def _image_roots(self) -> list[str]:
        """The folders of the indexed image files (a saved index must not replace them)."""
        return sorted({os.path.dirname(p) or "." for p in self.paths if p is not None})

    @classmethod
    def load(cls, path: str | os.PathLike, device=None) -> "CIRIndex":
        """The index saved in `path`, its embeddings on `device` (default: the CPU). Every embeddings file is checked
        against its manifest and `index.json`: a swapped, truncated or foreign file, or a non-finite embedding, is an
        `index_storage.IndexFileError` naming the file; an index of an earlier format is refused (rebuild it)."""
        saved = read_index(path, device)
        index = cls(saved["embeddings"], saved["image_ids"], saved["paths"], saved["fingerprint"],
                    saved.get("sources", []))
        index._load_faiss(path, embeddings_digest(saved))
        return index


def _check_embeddings(embeddings: torch.Tensor) -> None:
    """Gallery embeddings are floating point `[N, D]` / `[N, Q, D]` and finite: integer ones score every image 0,
    NaN ones give NaN scores."""
    if not embeddings.is_floating_point() or embeddings.ndim not in (2, 3):
        raise ValueError(f"gallery embeddings are floating point (float32, float16, bfloat16) [N, D] or [N, Q, D] "
                         f"(model.get_target_embeds), got "
                         f"{embeddings.dtype} of shape {tuple(embeddings.shape)}; convert them first (e.g. .float()).")
    bad = nonfinite_rows(embeddings)
    if bad:
        raise ValueError(f"{len(bad)} gallery embeddings hold NaN or inf (first: row {bad[0]}); the model that encoded "
                         "them produced non-finite outputs: check its weights and encode the gallery again.")


def _counts(items) -> dict:
    counts: dict = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


__all__ = ["CIRIndex", "ModelMismatchError", "model_fingerprint", "describe_fingerprint"]
