"""CIRR Recall@K and Recall_subset@K as an `evaluate` metric (calls `trainers.evaluation`).

    metric = evaluate.load(trainers.metric_path("cirr"))
    metric.compute(predictions=ranked_ids, references=target_ids, subset_predictions=ranked_subset_ids)

`predictions[i]`: gallery ids ranked best first with the reference already removed (at least 50 deep);
`subset_predictions[i]`: the query's group members minus the reference, ranked best first.
A target absent from a ranking shorter than K counts as a miss; an id listed twice is an error.
"""

import evaluate

from trainers.evaluation import (
    CIRR_RECALL_KS,
    CIRR_SUBSET_KS,
    PROTOCOLS,
    cirr_average,
    metric_info,
    recall_from_rankings,
)

_CITATION = """@inproceedings{liu2021cirr, title={Image Retrieval on Real-life Images with Pre-trained
Vision-and-Language Models}, author={Liu, Zheyuan and Rodriguez-Opazo, Cristian and Teney, Damien and Gould,
Stephen}, booktitle={ICCV}, year={2021}}"""


class Cirr(evaluate.Metric):
    def _info(self):
        return metric_info("CIRR recall@1/5/10/50, recall_subset@1/2/3 and average. Protocol: " + PROTOCOLS["cirr"],
                           _CITATION, __doc__)

    def _compute(self, predictions, references, subset_predictions=None):
        metrics = recall_from_rankings(predictions, references, CIRR_RECALL_KS)
        if subset_predictions is not None:
            subset = recall_from_rankings(subset_predictions, references, CIRR_SUBSET_KS)
            metrics |= {k.replace("recall@", "recall_subset@"): v for k, v in subset.items()}
            metrics["average"] = cirr_average(metrics)
        return metrics
