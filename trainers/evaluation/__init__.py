"""Exact CIR evaluation, in one room: the protocols as objects (`protocols`), the ranking prelude every metric shares
(`ranking`), FashionIQ / CIRR / CIRCO / Recall@K metrics (`metrics`), test-server files (`submissions`), the
evaluator that encodes a split with a CIR model (`evaluator.CIREvaluator`), and several benchmarks in one run, each
with its protocol (`eval_datasets`: `run_cir.py --eval_datasets`, `SequentialEvaluator`).

What is exact: the ranking (the top-K lists of the reference code, for the same scores and without exact ties)
and therefore every hit count and the set of hits at each rank. The arithmetic on those counts is the reference
code's in some cases and close to it in the others:
- recalls are `(hits_tensor / n_queries).item() * 100` (a float32 ratio), bit-for-bit CLIP4Cir's `validate.py`,
  the TG-CIR / BLIP4CIR / SPRC code and SPN4CIR's CIRR code; SPN4CIR's CLIP4CIR FashionIQ code computes
  `hits / N * 100` in Python doubles, so its numbers can differ in the float32 rounding of the ratio (below
  1e-5 in percent);
- the FashionIQ averages use `statistics.mean`, as CLIP4Cir and SPN4CIR;
- CIRCO's AP@K is computed in float32 torch tensors, as the CIRCO authors' validation code (SEARLE
  `circo_compute_val_metrics`), and averaged with a Python sum where that code uses `np.mean`; the CIRCO
  `evaluation.py` (the test server's) computes in numpy float64: mAP values can differ by float rounding
  (relative 1e-6), never by a hit. The Recall@K of `target_img_id` and the mAP@10 per semantic aspect that
  `evaluation.py` also reports are computed with its own numpy float64 operations and equal its numbers.

Ranking (`rank_gallery`, on `modeling_spn4cir.retrieval.rank_topk`) is exact, computed in query chunks with
`torch.topk`, in memory O(chunk * M + N * k); no N x M argsort and no N x M array of strings. Scores are cosine
similarity by default, or a CIR model's own `similarity` (`similarity=model.similarity`, e.g. SPRC's max over
target tokens, where `gallery_embeds` is `[M, Q, D]`). **Ties** are broken by gallery order:
of two gallery images with the same score, the one listed first in `gallery_ids` ranks higher. (The reference
code uses an unstable argsort, so on exact ties it has no defined order; with float features ties are rare.)

Protocols (`Protocol` objects, `protocol_for(dataset, remove_reference=...)`; say which one with every number you
publish, `PROTOCOLS[name]`):
- `fashioniq`: gallery = the category's `split.{cat}.val.json`; hit if the target is in the top K.
  `remove_reference=False` (the reference stays in the ranking) is the CLIP4Cir / TG-CIR / BLIP4CIR / SPRC code;
  `remove_reference=True` is SPN4CIR's CLIP4CIR code (the reference is deleted before the top K).
- `cirr`: gallery = every image of the split file; the reference is deleted from each ranking; the subset
  ranking is the full ranking restricted to the query's group members minus the reference (5 images).
- `circo`: mAP@K = mean over queries of sum_{i<=K} P@i * rel(i) / min(|GT|, K); `remove_reference=False` (the
  default, protocol `circo`) ranks the whole gallery as the CIRCO authors' code does; `True`
  (`circo_remove_reference`) deletes the reference first. Where the triplets have them, also `recall@K` of
  `target_id` and `semantic_map@10_<aspect>` over the queries with that `semantic_aspects` entry (the authors'
  `evaluation.py`). `circo_shared_concept` (and `..._remove_reference`): the same, the query text
  `"{shared_concept} {relative_caption}"` (as BGE-VL reports CIRCO).

Bad data is an error naming the query, never a number: a NaN/inf embedding (it would rank by gallery order and
give finite, plausible metrics), an empty query set, a gallery left empty by `remove_reference`, a CIRR target
that is not among its group members (the CIRR annotations always list it there; the reference code
(CLIP4Cir `validate.py`) would count such a query as a silent subset miss, and the test server's code is not
public), a CIRCO query without ground truths (NaN), an id listed twice in one ranking (CIRCO mAP above 100).
A ranking shorter than K (a small gallery, or 50-deep id lists with the reference removed) counts an absent
target as a **miss**, never a hit. Embeddings may be torch tensors or numpy arrays.
"""

from .eval_datasets import (
    EvalDataset,
    EvalDatasetError,
    SequentialEvaluator,
    parse_eval_datasets,
)
from .evaluate_modules import metric_info
from .evaluator import CIREvaluator
from .metrics import (
    CIRCO_KS,
    CIRR_RECALL_KS,
    CIRR_SUBSET_KS,
    FASHIONIQ_KS,
    circo_metrics,
    cirr_average,
    cirr_metrics,
    fashioniq_average,
    fashioniq_metrics,
    map_from_rankings,
    recall_from_rankings,
    recall_metrics,
)
from .protocols import PROTOCOLS, EncodedSplit, Protocol, get_protocol, protocol_for
from .ranking import Ranking, rank_gallery, rank_queries, rank_subsets
from .submissions import cirr_predictions, write_circo_submission, write_cirr_submission

__all__ = [
    "PROTOCOLS",
    "Protocol",
    "EncodedSplit",
    "get_protocol",
    "protocol_for",
    "CIREvaluator",
    "SequentialEvaluator",
    "EvalDataset",
    "EvalDatasetError",
    "parse_eval_datasets",
    "rank_gallery",
    "rank_subsets",
    "rank_queries",
    "Ranking",
    "fashioniq_metrics",
    "fashioniq_average",
    "cirr_metrics",
    "cirr_average",
    "circo_metrics",
    "recall_metrics",
    "recall_from_rankings",
    "map_from_rankings",
    "cirr_predictions",
    "write_cirr_submission",
    "write_circo_submission",
    "metric_info",
    "CIRR_RECALL_KS",
    "CIRR_SUBSET_KS",
    "FASHIONIQ_KS",
    "CIRCO_KS",
]
