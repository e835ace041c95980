"""Retrieval: everything that ranks a gallery for composed queries, in one room.

- `ranking`: the one exact top-k ranker (`rank_topk`, `rank_candidates` -> [`Ranked`]: indices and their scores
  from one scoring pass), used by evaluation, positive-scaling pairing, the index and the report;
- `index`: [`CIRIndex`], a gallery encoded once by a model's target side (build / add / save / load / search),
  fingerprinted by the one target-side fingerprint; `gallery_images` resolves what it indexes (a folder, files, a
  corpus) and `index_storage` keeps it on disk in the shard store (and builds it resumably); `references` finds a
  query's reference in the gallery (left out of its results, as the protocols do); `faiss_backend` is the
  approximate backend (HNSW or IVF-PQ), saved beside the index;
- `pipeline_cir`: the `"composed-image-retrieval"` transformers pipeline (imports only torch and transformers, so
  that `pipe.save_pretrained` ships it for `trust_remote_code`); importing `modeling_spn4cir` registers the task;
- `report`: the retrieval report (HTML page and PNG contact sheet) the evaluator writes after each evaluation.
"""

from .faiss_backend import FaissIndex, FaissSettings
from .index import CIRIndex, ModelMismatchError, describe_fingerprint, model_fingerprint
from .index_storage import IndexFileError
from .pipeline_cir import TASK, ComposedImageRetrievalPipeline
from .ranking import DEFAULT_CHUNK_SIZE, Ranked, Similarity, dot_scores, rank_candidates, rank_topk
from .report import ReportHit, ReportRow, evaluation_rows, render_html, write_report

__all__ = [
    "CIRIndex",
    "FaissIndex",
    "FaissSettings",
    "ModelMismatchError",
    "IndexFileError",
    "describe_fingerprint",
    "model_fingerprint",
    "TASK",
    "ComposedImageRetrievalPipeline",
    "DEFAULT_CHUNK_SIZE",
    "Ranked",
    "Similarity",
    "dot_scores",
    "rank_candidates",
    "rank_topk",
    "ReportHit",
    "ReportRow",
    "evaluation_rows",
    "render_html",
    "write_report",
]
