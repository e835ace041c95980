"""Which gallery image a query's reference is: the protocols (CIRR, FashionIQ as SPN evaluates it, CIRCO's
variant) leave the reference out of its own ranking, and so does retrieval by default.

A reference named by its gallery id is found by the id. A reference given as an image (an upload, a file) is found
by its content: the gallery image whose stored target embedding is that of the reference (cosine of the flattened
embeddings at least [`SAME_IMAGE_COSINE`]). Identical pixels give identical embeddings up to float rounding (a
float16 index, another batch size, another device's kernels), which the threshold allows; two different images
almost never come that close. An image re-encoded lossily (a JPEG of a PNG) may or may not match.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Cosine of the flattened target embeddings above which two images count as the same image.
SAME_IMAGE_COSINE = 0.9999
_GALLERY_CHUNK = 2**16  # gallery rows compared at once (a float32 copy of one chunk is made)
# FAISS candidates a reference is looked for among (approximate codes may rank it below a few near neighbours).
FAISS_CANDIDATES = 100


def same_image_rows(gallery: torch.Tensor, target_embeds: torch.Tensor,
                    candidates: torch.Tensor | None = None) -> list[int | None]:
    """
    The gallery row holding each image of `target_embeds`, or None.

    Args:
        gallery: `[N, D]` or `[N, Q, D]` target embeddings of the gallery.
        target_embeds: `[B, D]` or `[B, Q, D]` target embeddings (`model.get_target_embeds`) of the references.
        candidates: `[B, C]` rows to compare each reference with (e.g. a FAISS search's; -1: none), or None for
            the whole gallery.

    Returns:
        per reference, the most similar row if its cosine is at least `SAME_IMAGE_COSINE` (ties to the lower row),
        else None.
    """
    if tuple(target_embeds.shape[1:]) != tuple(gallery.shape[1:]):
        raise ValueError(f"reference embeddings of shape {tuple(target_embeds.shape[1:])} cannot be compared with a "
                         f"gallery of rows {tuple(gallery.shape[1:])}: they come from another model.")
    refs = torch.nn.functional.normalize(target_embeds.detach().float().flatten(1).cpu(), dim=-1)
    best = torch.full((refs.shape[0],), float("-inf"))
    rows = torch.full((refs.shape[0],), -1, dtype=torch.long)
    if candidates is not None:
        found = candidates >= 0
        picked = gallery[candidates.clamp(min=0).flatten()].float().flatten(1).cpu()
        cosine = torch.einsum("bd,bcd->bc", refs, torch.nn.functional.normalize(picked, dim=-1).view(
            *candidates.shape, -1)).masked_fill(~found, float("-inf"))
        by_row = candidates.clamp(min=0).sort(dim=1)
        cosine = cosine.gather(1, by_row.indices)
        best, at = cosine.max(dim=1)
        rows = by_row.values.gather(1, at[:, None]).squeeze(1)
    else:
        for start in range(0, gallery.shape[0], _GALLERY_CHUNK):
            chunk = torch.nn.functional.normalize(gallery[start:start + _GALLERY_CHUNK].float().flatten(1).cpu(),
                                                  dim=-1)
            value, at = (refs @ chunk.T).max(dim=1)
            better = value > best  # strictly: an equal later row does not replace an earlier one
            best, rows = torch.where(better, value, best), torch.where(better, at + start, rows)
    return [int(r) if b >= SAME_IMAGE_COSINE else None for r, b in zip(rows.tolist(), best.tolist())]


def references_in_gallery(index, reference_ids: Sequence[str | None] | None = None,
                          reference_embeds: torch.Tensor | None = None, backend: str = "exact") -> list[str | None]:
    """`CIRIndex.references_in_gallery` of `index`: per query, `reference_ids[b]` (a gallery id) where given, else
    the gallery image holding its row of `reference_embeds` ([`same_image_rows`], among the FAISS index's candidates
    with `backend="faiss"`), else None."""
    n = len(reference_ids) if reference_ids is not None else len(reference_embeds)
    ids = list(reference_ids) if reference_ids is not None else [None] * n
    missing = [i for i in ids if i is not None and i not in index]
    if missing:
        raise KeyError(f"reference images {missing[:5]} are not in the index; pass gallery ids (`index.image_ids`).")
    todo = [b for b, i in enumerate(ids) if i is None]
    if reference_embeds is not None and todo:
        embeds = reference_embeds[todo].to(index.embeddings.device)
        candidates = index.faiss_index().candidates(embeds, FAISS_CANDIDATES) if backend == "faiss" else None
        for b, row in zip(todo, same_image_rows(index.embeddings, embeds, candidates)):
            ids[b] = index.image_ids[row] if row is not None else None
    return ids


__all__ = ["SAME_IMAGE_COSINE", "references_in_gallery", "same_image_rows"]
