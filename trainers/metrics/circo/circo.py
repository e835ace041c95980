"""CIRCO mAP@K as an `evaluate` metric (calls `trainers.evaluation`).

    metric = evaluate.load(trainers.metric_path("circo"))
    metric.compute(predictions=ranked_ids, references=gt_ids_lists)

`predictions[i]`: gallery ids ranked best first, 50 deep, as ranked (the CIRCO authors' protocol keeps the
reference; delete it beforehand for `circo_remove_reference`); `references[i]`: `gt_img_ids`.
An id listed twice in a ranking, or an empty `references[i]`, is an error naming the query.
"""

import evaluate

from trainers.evaluation import PROTOCOLS, map_from_rankings, metric_info

_CITATION = """@inproceedings{baldrati2023zero, title={Zero-Shot Composed Image Retrieval with Textual
Inversion}, author={Baldrati, Alberto and Agnolucci, Lorenzo and Bertini, Marco and Del Bimbo, Alberto},
booktitle={ICCV}, year={2023}}"""


class Circo(evaluate.Metric):
    def _info(self):
        return metric_info("CIRCO map@5/10/25/50. Protocol: " + PROTOCOLS["circo"], _CITATION, __doc__,
                           references_are_lists=True)

    def _compute(self, predictions, references):
        return map_from_rankings(predictions, references)
