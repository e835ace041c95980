"""FashionIQ Recall@10/50 as an `evaluate` metric (calls `trainers.evaluation`).

    metric = evaluate.load(trainers.metric_path("fashioniq"))
    metric.compute(predictions=ranked_ids, references=target_ids)                     # reference kept
    metric.compute(predictions=ranked_ids, references=target_ids, reference_ids=refs,
                   remove_reference=True)                                            # SPN4CIR CLIP4CIR

`predictions[i]`: the category gallery's ids ranked best first (at least 51 deep when removing references:
a target absent from a ranking shorter than K counts as a miss, and an id listed twice is an error).
"""

import evaluate

from trainers.evaluation import FASHIONIQ_KS, PROTOCOLS, metric_info, recall_from_rankings

_CITATION = """@inproceedings{wu2021fashioniq, title={Fashion IQ: A New Dataset Towards Retrieving Images by
Natural Language Feedback}, author={Wu, Hui and Gao, Yupeng and Guo, Xiaoxiao and Al-Halah, Ziad and Rennie,
Steven and Grauman, Kristen and Feris, Rogerio}, booktitle={CVPR}, year={2021}}"""


class Fashioniq(evaluate.Metric):
    def _info(self):
        return metric_info("FashionIQ recall@10/50 for one category. Protocols: " + PROTOCOLS["fashioniq"] + "; or, "
                           "with remove_reference=True, " + PROTOCOLS["fashioniq_remove_reference"], _CITATION, __doc__)

    def _compute(self, predictions, references, reference_ids=None, remove_reference=False):
        if remove_reference:
            if reference_ids is None or len(reference_ids) != len(predictions):
                raise ValueError("remove_reference=True needs one reference id per prediction (reference_ids=...).")
            predictions = [[x for x in p if x != r] for p, r in zip(predictions, reference_ids)]
        return recall_from_rankings(predictions, references, FASHIONIQ_KS)
