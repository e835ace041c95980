"""The `"composed-image-retrieval"` pipeline: a reference image plus a modification text -> the best gallery images.

    import modeling_spn4cir                                   # registers the task (and the model families)
    from modeling_spn4cir.retrieval import CIRIndex
    from transformers import pipeline

    pipe = pipeline("composed-image-retrieval", model="out/stage2")
    gallery = CIRIndex.load("my_images.idx")                  # built by the same model's target side
    pipe(image, "is red and sleeveless", gallery=gallery, top_k=10)
    # [{"image_id": "dress/B00X.jpg", "score": 0.41, "path": "/data/dress/B00X.jpg"}, ...]
    pipe([image1, image2], ["is red", "has no sleeves"], gallery=gallery, batch_size=2)   # a list per query
    pipe(reference_id="dress/B00Y.jpg", text="is red", gallery=gallery)          # a gallery image as the reference

As the evaluation protocols do, a query's reference is left out of its own results when it is in the gallery: by
its id (`reference_id=`), or by its content for an image (the gallery image whose stored target embedding is the
reference's: `CIRIndex.references_in_gallery`); `keep_reference=True` keeps it.

Every query is encoded through the model contract, never a family's internals: a composed query by
`get_query_embeds`; a text-only one (`pipe(text="a red dress", gallery=...)`) by `get_text_query_embeds`, where the
model can compose a query without an image (CLIP4CIR summing text and image features: the normalized text feature),
else its error says so; an image-only one (`pipe(image, gallery=...)`) by `get_image_query_embeds` (the reference's
own target embedding, single-vector families). A composed query's reference is encoded once for both roles
(`get_target_embeds_and_reference_features`): its reference features compose the query, its target embedding finds
it in the gallery.

This file imports only torch and transformers (and the package's image rule where it is installed), so
`pipe.save_pretrained(dir)` / `pipe.push_to_hub(repo)` ship it beside the model code and
`pipeline(model=dir_or_repo, trust_remote_code=True)` runs it without this package (images are then loaded by
transformers' `load_image`: EXIF applied, 16-bit grayscale not scaled). The gallery is any object with the methods
of `CIRIndex` used here: `check_model`, `topk`, `hits`, `references_in_gallery` and (for `reference_id=`)
`open_image`.
"""

from __future__ import annotations

import os

import torch
from transformers import AutoModel, Pipeline
from transformers.image_utils import load_image
from transformers.pipelines import PIPELINE_REGISTRY

try:  # the project's one image rule (first frame, EXIF, 16-bit), as the index encoded its images
    from modeling_spn4cir.image_files import open_image
except ImportError:  # shipped without the package (`trust_remote_code`): transformers' loader (EXIF applied)
    open_image = None

TASK = "composed-image-retrieval"


class ComposedImageRetrievalPipeline(Pipeline):
    """
    `pipe(images=None, text=None, gallery=..., top_k=10)`.

    Args:
        images: a reference image (PIL image, path or URL), a list of them, or None (text-only queries).
        text: the modification text, a list of them (one per image), or None (image-only queries).
        reference_id: instead of `images`, the gallery id of the reference image (or a list of them).
        gallery: a gallery index built by this model (`modeling_spn4cir.retrieval.CIRIndex`); an index built by
            another model is refused with an error naming both models.
        top_k: results per query.
        backend: `"exact"` (default) or `"faiss"` (approximate; see `CIRIndex.topk`); `nprobe=`, `ef_search=` and
            `refine=` override the FAISS index's own search settings.
        keep_reference: keep the query's reference in its results (default: left out when it is in the gallery).

    Returns:
        per query, `[{"image_id", "score", "path"}, ...]`, best first (a list of such lists for list inputs).
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False

    def __call__(self, images=None, text=None, reference_id=None, **kwargs):
        gallery = kwargs.get("gallery", self._forward_params.get("gallery"))
        if gallery is None:
            raise ValueError("Pass gallery=... : a gallery index built with this model (CIRIndex.build / .load).")
        if reference_id is not None:
            if images is not None:
                raise ValueError("Pass the reference as an image (images=) or as a gallery id (reference_id=), not both.")
            images = ([gallery.open_image(i) for i in reference_id] if isinstance(reference_id, (list, tuple))
                      else gallery.open_image(reference_id))
        listed = isinstance(images, (list, tuple)) or isinstance(text, (list, tuple))
        if listed:
            n = len(images) if isinstance(images, (list, tuple)) else len(text)
            images = list(images) if isinstance(images, (list, tuple)) else [images] * n
            texts = list(text) if isinstance(text, (list, tuple)) else [text] * n
            ids = list(reference_id) if isinstance(reference_id, (list, tuple)) else [reference_id] * n
            if len(images) != len(texts):
                raise ValueError(f"{len(images)} reference images for {len(texts)} modification texts; pass one text "
                                 "per image (or None for image-only queries).")
            inputs = [{"image": i, "text": t, "reference_id": r} for i, t, r in zip(images, texts, ids)]
        else:
            inputs = {"image": images, "text": text, "reference_id": reference_id}
        gallery.check_model(self.model, self.image_processor)
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(self, gallery=None, top_k=None, backend=None, keep_reference=None, nprobe=None,
                             ef_search=None, refine=None, **kwargs):
        forward = {k: v for k, v in (("gallery", gallery), ("top_k", top_k), ("backend", backend),
                                     ("keep_reference", keep_reference)) if v is not None}
        faiss_search = {k: v for k, v in (("nprobe", nprobe), ("ef_search", ef_search), ("refine", refine))
                        if v is not None}
        if faiss_search:
            forward["faiss_search"] = faiss_search
        return {}, forward, {"gallery": gallery} if gallery is not None else {}

    def preprocess(self, inputs):
        image, text = inputs.get("image"), inputs.get("text")
        if text is not None and not isinstance(text, str):
            raise TypeError(f"A modification text is a string (or None), got {type(text).__name__}: {text!r:.80}.")
        text = text if text and text.strip() else None  # blank text is no text, as ""
        if image is None and text is None:
            raise ValueError("A query needs a reference image, a modification text, or both (the text is blank).")
        tokens = self.processor(text=[text or ""], return_tensors="pt")
        if image is not None:
            # URLs, base64 strings and missing files: transformers' loader (and its error)
            picture = load_image(image) if open_image is None or (isinstance(image, str) and not os.path.isfile(
                image)) else open_image(image)
            pixels = self.image_processor([picture], return_tensors="pt")["pixel_values"]
        else:
            from PIL import Image

            pixels = torch.zeros_like(self.image_processor([Image.new("RGB", (8, 8))],
                                                           return_tensors="pt")["pixel_values"])
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"], "pixel_values": pixels,
                "has_image": torch.tensor([image is not None]), "has_text": torch.tensor([bool(text)]),
                "reference_id": inputs.get("reference_id")}

    def _forward(self, model_inputs, gallery=None, top_k=10, backend="exact", keep_reference=False,
                 faiss_search=None):
        has_image, has_text = model_inputs["has_image"].bool(), model_inputs["has_text"].bool()
        ids, mask, pixels = model_inputs["input_ids"], model_inputs["attention_mask"], model_inputs["pixel_values"]
        reference_ids = model_inputs["reference_id"]
        reference_ids = reference_ids if isinstance(reference_ids, list) else [reference_ids]
        queries, references = self._encode_queries(ids, mask, pixels, has_image, has_text)
        exclude = None
        if not keep_reference and has_image.any():
            exclude = gallery.references_in_gallery(reference_ids, references, backend)
        indices, scores = gallery.topk(queries, top_k, similarity=self.model.similarity, backend=backend,
                                       exclude=exclude, **(faiss_search or {}))
        return {"indices": indices, "scores": scores}

    def _encode_queries(self, ids, mask, pixels, has_image, has_text):
        """(queries `[B, D]`, the references' target embeddings `[B, ...]`: zeros for text-only queries, or None
        without any reference)."""

        def composed(rows):
            targets, features = self.model.get_target_embeds_and_reference_features(pixels[rows])
            return self.model.get_query_embeds(ids[rows], mask[rows], reference_features=features), targets

        def image_only(rows):
            targets = self.model.get_image_query_embeds(pixels[rows])
            return targets, targets

        def text_only(rows):
            return self.model.get_text_query_embeds(ids[rows], mask[rows]), None

        # A batch may mix composed, image-only and text-only queries: each kind is encoded by its own rule.
        kinds = ((has_image & has_text, composed), (has_image & ~has_text, image_only),
                 (has_text & ~has_image, text_only))
        parts = [(rows, *encode(rows)) for rows, encode in kinds if rows.any()]
        queries = parts[0][1].new_empty(ids.shape[0], parts[0][1].shape[-1])
        shape = next((t.shape[1:] for _, _, t in parts if t is not None), None)
        references = None if shape is None else queries.new_zeros(ids.shape[0], *shape)
        for rows, embeds, targets in parts:
            queries[rows] = embeds.to(queries.dtype)
            if targets is not None:
                references[rows] = targets.to(references.dtype)
        return queries, references

    def postprocess(self, model_outputs, gallery=None):
        return gallery.hits(model_outputs["indices"], model_outputs["scores"])[0]

    def save_pretrained(self, save_directory, **kwargs):
        """The model, its processor and this pipeline's code (`config.custom_pipelines`), for `trust_remote_code`."""
        super().save_pretrained(save_directory, **kwargs)
        self.processor.save_pretrained(save_directory)


PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=ComposedImageRetrievalPipeline, pt_model=AutoModel,
                                    type="multimodal")

__all__ = ["ComposedImageRetrievalPipeline", "TASK"]
