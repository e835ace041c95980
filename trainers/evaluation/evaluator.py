"""`CIREvaluator`: encode a gallery and its queries with any model implementing the CIR model contract and
return the dataset's official metrics (sentence-transformers evaluator style)."""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from modeling_spn4cir.image_store import ImageStore, encode_images
from modeling_spn4cir.retrieval.report import check_report_dir, evaluation_rows, spread, write_report
from modeling_spn4cir.storage import same_target_side

from ..text import compose_text, describe_triplet, tokenize
from .protocols import EncodedSplit, Protocol, get_protocol, protocol_for

logger = logging.getLogger(__name__)


class CIREvaluator:
    """
    Evaluate a CIR model on one split.

    Args:
        corpus: an HF `datasets.Dataset` with `image_id`, `image` (and `category` for FashionIQ): the gallery.
        triplets: an HF `datasets.Dataset` in the project schema (`reference_id`, `target_id`,
            `modification_texts`, optional `target_ids`, `group_members`, `query_id`, `category`).
        image_processor: maps a list of PIL images to `pixel_values`.
        tokenizer: the modification texts' tokenizer, or better the model's processor (called with `text=`, so
            that a family's own text handling applies, e.g. SPRC's caption cleaning, BLIP4CIR's `[ENC]`).
        protocol: a [`Protocol`] or its name (a key of `PROTOCOLS`: `"fashioniq"`, `"fashioniq_remove_reference"`,
            `"cirr"`, `"circo"`, `"circo_remove_reference"` or `"recall"`, generic Recall@1/5/10/50, reference
            removed): its metrics, headline, reference removal, gallery scope and test-server files apply.
        remove_reference: with a name, `protocol_for(name, remove_reference=True)`: FashionIQ and CIRCO delete the
            reference from each ranking (FashionIQ: SPN4CIR's CLIP4CIR protocol; CIRCO: the authors' code keeps
            it); CIRR and `recall` always delete it.
        text_mode: `"join"` or `"choice"` (see `trainers.text`); default: the protocol's (`"join"` for FashionIQ).
        name: prefix of the returned metric names (`"{name}_{metric}"`; no prefix when empty).
        submission_dir: for CIRR / CIRCO splits without targets, where to write test-server files.
        report_dir: where to write a retrieval report after each evaluation (`modeling_spn4cir.retrieval.report`:
            an HTML page with embedded thumbnails and a PNG contact sheet of `report_queries` queries spread over
            the split, their `report_top_k` results, the targets marked and their rank); None writes none.
        split: the evaluated split's name (e.g. `"fashioniq dress val"`), for the report's title.
        model_name: what the report calls the evaluated model (e.g. the output directory of the run training it);
            default: the model's `name_or_path` (during training, the model it started from).

    `evaluator(model)` puts the model in eval mode, encodes every gallery image once (features kept on the
    CPU between batches), builds the queries from the cached reference features, ranks with the model's own
    `similarity`, and returns the metrics.
    """

    def __init__(
        self,
        corpus,
        triplets,
        image_processor,
        tokenizer,
        protocol: str | Protocol = "recall",
        remove_reference: bool = False,
        text_mode: str | None = None,
        name: str = "",
        batch_size: int = 64,
        num_workers: int = 0,
        max_length: int | None = None,
        submission_dir: str | None = None,
        show_progress_bar: bool = True,
        report_dir: str | None = None,
        report_queries: int = 8,
        report_top_k: int = 8,
        split: str | None = None,
        model_name: str | None = None,
    ):
        self.corpus, self.triplets = corpus, triplets
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.protocol = _resolve(protocol, remove_reference)
        self.text_mode = text_mode or self.protocol.text_mode
        self.name = name
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_length = max_length
        self.submission_dir = submission_dir
        self.show_progress_bar = show_progress_bar
        self.report_dir, self.report_queries, self.report_top_k = report_dir, report_queries, report_top_k
        if report_dir is not None:  # refused now, not after the first evaluation
            check_report_dir(report_dir)
        self.split, self.model_name = split, model_name
        self.images = ImageStore(corpus)
        self.bank = None
        self._digests: tuple[list, list[str]] | None = None  # (stamps, sha256) of the gallery images

    def use_bank(self, bank) -> None:
        """Reuse a stage-2 candidate bank ([`CandidateBank`]): a gallery image whose bytes the bank holds is not
        encoded again when the evaluated model's frozen towers and the image processor are the bank's (checked
        by their fingerprints at each evaluation) and the bank is stored in fp32 (a half-precision bank's rows
        would change the metrics); every other gallery image is encoded."""
        self.bank = bank

    @property
    def protocol_description(self) -> str:
        return self.protocol.description

    @property
    def primary_metric(self) -> str:
        return self._key(self.protocol.headline)

    def _key(self, metric: str) -> str:
        return f"{self.name}_{metric}" if self.name else metric

    def _bank_rows(self, model, gallery_ids: list[str]) -> list[int | None]:
        """The bank row holding each gallery image (matched by the sha256 of its bytes), or None."""
        bank = self.bank
        none = [None] * len(gallery_ids)
        if bank is None or bank.image_digests is None:
            return none
        fingerprint = bank.fingerprint
        if fingerprint.get("dtype") != "float32":
            logger.info("Evaluation encodes the whole gallery: the candidate bank is stored in %s, not float32.",
                        fingerprint.get("dtype"))
            return none
        try:
            same = same_target_side(fingerprint, model, self.image_processor)
        except AttributeError:  # not a CIR model with a target side
            return none
        if not same:
            logger.info("Evaluation encodes the whole gallery: the model's target side or the image processor is "
                        "not the candidate bank's.")
            return none
        stamps = self.images.stamps(gallery_ids)
        if self._digests is None or None in stamps or self._digests[0] != stamps:
            self._digests = (stamps, self.images.digests(gallery_ids))
        row_of = {digest: row for row, digest in enumerate(bank.image_digests)}
        return [row_of.get(digest) for digest in self._digests[1]]

    def _gallery_features(self, model, gallery_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Target embeddings and reference features of the gallery: the bank's rows where it holds the image
        (see `use_bank`), the others encoded."""
        rows = self._bank_rows(model, gallery_ids)
        missing = [i for i, row in enumerate(rows) if row is None]
        held = [i for i, row in enumerate(rows) if row is not None]
        if held:
            logger.info("Evaluation reuses %d of %d gallery images from the candidate bank and encodes the other %d.",
                        len(held), len(gallery_ids), len(missing))
        encoded = None
        if missing:
            encoded = encode_images(
                model.get_target_embeds_and_reference_features, self.images, [gallery_ids[i] for i in missing],
                self.image_processor, self.batch_size, self.num_workers, device=next(model.parameters()).device,
                show_progress_bar=self.show_progress_bar, desc="gallery",
            )
            if not held:
                return encoded
        bank_rows = [rows[i] for i in held]
        from_bank = (self.bank.target_embeds[bank_rows].float(), self.bank.reference_features[bank_rows].float())
        out = []
        for k, part in enumerate(from_bank):
            full = torch.empty((len(gallery_ids), *part.shape[1:]), dtype=torch.float32)
            full[held] = part
            if encoded is not None:
                full[missing] = encoded[k].float()
            out.append(full)
        return tuple(out)

    def _query_embeds(self, model, texts: list[str], reference_features: torch.Tensor) -> torch.Tensor:
        device = next(model.parameters()).device
        out = []
        for start in tqdm(range(0, len(texts), self.batch_size), desc="Encoding queries",
                          disable=not self.show_progress_bar):
            tokens = tokenize(self.tokenizer, texts[start : start + self.batch_size], self.max_length)
            with torch.no_grad():
                q = model.get_query_embeds(
                    tokens["input_ids"].to(device),
                    tokens["attention_mask"].to(device),
                    reference_features=reference_features[start : start + self.batch_size].to(device),
                )
            out.append(q.float().cpu())
        return torch.cat(out)

    def __call__(self, model) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            return self._evaluate(model)
        finally:
            model.train(was_training)

    def _evaluate(self, model) -> dict[str, float]:
        triplets = self.triplets
        if len(triplets) == 0:
            raise ValueError(f"The evaluation triplets{self._named} are empty: there is no query to evaluate (check "
                             "the split's annotations, or pass another split).")
        self.images.check(triplets["reference_id"], "reference images of the triplets")
        gallery_ids = list(dict.fromkeys(self.corpus["image_id"]))
        gallery, references = self._gallery_features(model, gallery_ids)
        position = {image_id: i for i, image_id in enumerate(gallery_ids)}
        reference_ids = list(triplets["reference_id"])
        texts = [compose_text(t, self.text_mode, training=False, triplet=describe_triplet({"reference_id": r}, i))
                 for i, (t, r) in enumerate(zip(self.protocol.query_texts(triplets), reference_ids))]
        queries = self._query_embeds(model, texts, references[[position[r] for r in reference_ids]])
        split = EncodedSplit(queries, gallery, gallery_ids, reference_ids, triplets, self.corpus, model.similarity)
        if self.report_dir is not None and self.report_queries > 0:
            self._write_report(model, split, texts)
        has_targets = "target_id" in triplets.column_names and all(t is not None for t in triplets["target_id"])
        if not has_targets:
            return self._write_submission(split)
        return {self._key(k): v for k, v in self.protocol.evaluate(split).items()}

    @property
    def _named(self) -> str:
        return f" {self.name!r}" if self.name else ""

    def _write_report(self, model, split: EncodedSplit, texts: list[str]) -> None:
        triplets, protocol = self.triplets, self.protocol
        rows = evaluation_rows(split.queries, split.gallery, split.gallery_ids, split.reference_ids,
                               protocol.ground_truths(triplets), texts, self.images.images, model.similarity,
                               spread(len(triplets), self.report_queries), self.report_top_k,
                               protocol.remove_reference, protocol.query_galleries(split),
                               list(triplets["query_id"]) if "query_id" in triplets.column_names else None)
        model_name = self.model_name or getattr(model, "name_or_path", "") or type(model).__name__
        split = f", {self.split} split" if self.split else ""
        paths = write_report(self.report_dir, rows, f"Retrieval report: {model_name}{split}",
                             f"{self.protocol_description}; {len(rows)} of {len(triplets)} queries (spread evenly), "
                             f"top {self.report_top_k}; reference framed blue, ground-truth targets green.")
        logger.info("wrote the retrieval report %s and %s", paths["html"], paths["png"])

    def _write_submission(self, split: EncodedSplit) -> dict[str, float]:
        if self.protocol.submission is None:
            raise ValueError(
                f"The evaluation triplets{self._named} have no targets (a test split), and protocol "
                f"{self.protocol.name!r} has no test-server format: evaluate on a split with targets (e.g. val)."
            )
        if self.submission_dir is None:
            raise ValueError(
                "This split has no targets (a test split): pass submission_dir=... to write the test-server files."
            )
        paths = self.protocol.write_submission(split, self.submission_dir, self.name)
        logger.info("wrote submission files %s", ", ".join(map(str, paths)))
        return {}


def _resolve(protocol: str | Protocol, remove_reference: bool) -> Protocol:
    """The evaluator's protocol: an object as given, a name through `protocol_for` (after checking it exists)."""
    if isinstance(protocol, Protocol):
        if remove_reference and not protocol.remove_reference:
            raise ValueError(f"remove_reference=True, but protocol {protocol.name!r} keeps the reference: pass "
                             f"protocol_for({protocol.benchmark!r}, remove_reference=True) instead.")
        return protocol
    return protocol_for(get_protocol(protocol).name, remove_reference)
