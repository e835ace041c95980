"""Retrieval reports: for a few queries, the reference image, the modification text, the top-k gallery images with
their scores, the ground-truth target(s) marked and the target's rank — as a static HTML page (thumbnails embedded,
no server needed) and a PNG contact sheet of the same.

`CIREvaluator(..., report_dir=DIR, report_queries=N)` writes one after each evaluation (`evaluation_rows` ranks
exactly as the protocol does, with the one ranker: the same gallery, the reference removed where the protocol
removes it, ties to the image listed first; the shown scores and the targets' ranks come from that ranking's own
scoring pass); `examples/retrieve.py search --html` renders a single query with the same code.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..storage import check_output_file, write_output_file
from .ranking import rank_topk

HTML_FILE = "retrieval_report.html"
SHEET_FILE = "retrieval_report.png"
# What marks a page or sheet as written here (`storage.write_output_file` replaces only files carrying it).
GENERATOR = "spn4cir retrieval page"
# A page carries its generator tag; pages written before it are recognized by their own style sheet's first rule.
HTML_SIGNATURE = (f"<meta name='generator' content='{GENERATOR}'>".encode(),
                  b"<style>\nbody { font-family: system-ui, sans-serif; margin: 24px; color: #111; background: #fafafa; }")
SHEET_SIGNATURE = b"Software\x00" + GENERATOR.encode()  # the PNG text chunk `Software`
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TARGET_COLOUR = (22, 163, 74)  # green: the ground truth
REFERENCE_COLOUR = (37, 99, 235)  # blue: the query's reference


@dataclass
class ReportHit:
    """One ranked gallery image."""

    image_id: str
    score: float
    image: object  # PIL image
    rank: int
    is_target: bool = False


@dataclass
class ReportRow:
    """One query: its reference (None for text-only queries), text, ranked hits and the ground truth."""

    text: str
    hits: list[ReportHit]
    reference_id: str | None = None
    reference_image: object | None = None
    target_ids: list[str] = field(default_factory=list)
    # 1-based rank of the best-ranked target in the protocol's ranking; None without targets.
    target_rank: int | None = None
    # Targets ranked below the shown top k, with their rank: (image_id, image, rank).
    missed_targets: list[tuple[str, object, int]] = field(default_factory=list)
    query_id: str | None = None


def thumbnail(image, size: int = 128):
    """`image` scaled (up or down) so that its longer side is `size`, RGB."""
    image = image.convert("RGB")
    scale = size / max(image.size)
    from PIL import Image

    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                        Image.Resampling.LANCZOS)


def _data_uri(image, size: int) -> str:
    buffer = io.BytesIO()
    thumbnail(image, size).save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #111; background: #fafafa; }
h1 { font-size: 20px; margin: 0 0 4px; } p.notes { color: #555; margin: 0 0 16px; font-size: 13px; }
section.query { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 10px 12px; margin: 0 0 14px; }
section.query h2 { font-size: 14px; margin: 0 0 8px; font-weight: 600; }
.row { display: flex; flex-wrap: wrap; gap: 8px; align-items: flex-start; }
figure, .text { flex: none; }
figure { margin: 0; text-align: center; font-size: 11px; width: %(size)dpx; }
figure img { width: %(size)dpx; height: %(size)dpx; object-fit: contain; background: #eee;
  border: 3px solid transparent; border-radius: 4px; display: block; }
figure.reference img { border-color: rgb%(ref)s; }
figure.target img { border-color: rgb%(target)s; }
figcaption { word-break: break-all; margin-top: 2px; }
.text { width: 180px; font-size: 13px; padding: 6px; background: #f3f4f6; border-radius: 4px; align-self: stretch; }
.sep { border-left: 1px dashed #aaa; align-self: stretch; }
.rank { font-weight: 600; } .rank.hit { color: rgb%(target)s; } .rank.miss { color: #b91c1c; }
"""


def report_css(thumb_size: int = 112) -> str:
    """The page's style sheet (thumbnails of `thumb_size` pixels; a row of figures wraps instead of overflowing)."""
    return _CSS % {"size": thumb_size, "ref": REFERENCE_COLOUR, "target": TARGET_COLOUR}


def hit_figure(hit: ReportHit, thumb_size: int = 112) -> str:
    """One ranked image as a `<figure>`: the thumbnail (scaled to `thumb_size`, small images up), below it the
    rank, the score and the image id (wrapped, never cut off); a target has a green frame."""
    css_class = "hit target" if hit.is_target else "hit"
    return (f"<figure class='{css_class}' data-image-id='{html.escape(hit.image_id)}' data-rank='{hit.rank}' "
            f"data-score='{hit.score:.6f}'><img src='{_data_uri(hit.image, thumb_size)}' "
            f"alt='{html.escape(hit.image_id)}'><figcaption>#{hit.rank} &middot; {hit.score:.3f}<br>"
            f"{html.escape(hit.image_id)}{' &#10003; target' if hit.is_target else ''}</figcaption></figure>")


def render_html(rows: Sequence[ReportRow], title: str, notes: str = "", thumb_size: int = 112) -> str:
    """A self-contained HTML page: one section per query; the reference has a blue frame, targets a green one."""
    css = report_css(thumb_size)
    parts = [(f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'>{HTML_SIGNATURE[0].decode()}"
              f"<title>{html.escape(title)}</title>"),
             f"<style>{css}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    if notes:
        parts.append(f"<p class='notes'>{html.escape(notes)}</p>")
    for n, row in enumerate(rows, 1):
        if row.target_rank is None:  # a query without ground truth (a search) says only what is shown
            rank = f"<span class='rank'>top {len(row.hits)}</span>" if not row.target_ids else \
                "<span class='rank miss'>target not rankable</span>"
        else:
            in_top = row.target_rank <= len(row.hits)
            rank = f"<span class='rank {'hit' if in_top else 'miss'}'>target rank {row.target_rank}</span>"
        label = html.escape(row.query_id) if row.query_id is not None else str(n)
        parts.append(f"<section class='query' data-target-rank='{row.target_rank or ''}'>"
                     f"<h2>Query {label} &middot; {rank}</h2><div class='row'>")
        if row.reference_image is not None:
            parts.append(f"<figure class='reference'><img src='{_data_uri(row.reference_image, thumb_size)}' "
                         f"alt='reference {html.escape(row.reference_id or '')}'><figcaption>reference<br>"
                         f"{html.escape(row.reference_id or '')}</figcaption></figure>")
        parts.append(f"<div class='text'>&ldquo;{html.escape(row.text)}&rdquo;</div>")
        parts.extend(hit_figure(hit, thumb_size) for hit in row.hits)
        for image_id, image, target_rank in row.missed_targets:
            parts.append("<div class='sep'></div>"
                         f"<figure class='target missed' data-image-id='{html.escape(image_id)}'>"
                         f"<img src='{_data_uri(image, thumb_size)}' alt='target {html.escape(image_id)}'>"
                         f"<figcaption>target, rank {target_rank}<br>{html.escape(image_id)}</figcaption></figure>")
        parts.append("</div></section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=font) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    return lines + ([line] if line else [])


def contact_sheet(rows: Sequence[ReportRow], thumb_size: int = 96, text_width: int = 160):
    """One PIL image: per query, the reference (blue), the text, the top-k with their rank and score (targets green),
    then, as in the HTML page, the targets ranked below the top k with their rank, and the target's rank."""
    from PIL import Image, ImageDraw

    pad, label_h, frame, gap = 6, 20, 3, 14
    cell = thumb_size + 2 * frame
    shown = max((len(r.hits) + len(r.missed_targets) for r in rows), default=0)
    separated = any(r.missed_targets for r in rows)
    width = pad + (cell + pad) * (shown + 1) + text_width + pad + gap * separated + 110
    row_h = cell + label_h + pad
    sheet = Image.new("RGB", (width, pad + row_h * max(len(rows), 1)), "white")
    draw, font, label = ImageDraw.Draw(sheet), _font(12), _font(11)

    def paste(image, x, y, colour):
        draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour if colour is not None else (235, 235, 235))
        small_image = thumbnail(image, thumb_size)
        sheet.paste(small_image, (x + frame + (thumb_size - small_image.width) // 2,
                                  y + frame + (thumb_size - small_image.height) // 2))

    def caption(x, y, left: str, right: str, colour):
        # The rank at the cell's left edge, the score at its right: never run together ("#1 0.890", not "#10.890").
        draw.text((x + 1, y + cell + 3), left, fill=colour, font=label)
        draw.text((x + cell - 1 - draw.textlength(right, font=label), y + cell + 3), right, fill=colour, font=label)

    for n, row in enumerate(rows):
        y, x = pad + n * row_h, pad
        if row.reference_image is not None:
            paste(row.reference_image, x, y, REFERENCE_COLOUR)
            caption(x, y, "reference", "", REFERENCE_COLOUR)
        x += cell + pad
        for i, line in enumerate(_wrap(draw, f"\u201c{row.text}\u201d", font, text_width)[:7]):
            draw.text((x, y + 4 + 15 * i), line, fill=(17, 17, 17), font=font)
        x += text_width + pad
        for hit in row.hits:
            paste(hit.image, x, y, TARGET_COLOUR if hit.is_target else None)
            caption(x, y, f"#{hit.rank}", f"{hit.score:.3f}", TARGET_COLOUR if hit.is_target else (60, 60, 60))
            x += cell + pad
        if row.missed_targets:
            x += gap // 2
            for dash in range(y, y + cell, 8):
                draw.line([(x - pad // 2 - 1, dash), (x - pad // 2 - 1, dash + 4)], fill=(150, 150, 150))
            x += gap - gap // 2
        for _, image, target_rank in row.missed_targets:
            paste(image, x, y, TARGET_COLOUR)
            caption(x, y, "target", f"#{target_rank}", (185, 28, 28))
            x += cell + pad
        x = pad + (cell + pad) * (shown + 1) + text_width + pad + gap * separated
        if row.target_rank is not None:
            colour = TARGET_COLOUR if row.target_rank <= len(row.hits) else (185, 28, 28)
            draw.text((x, y + cell // 2 - 8), f"target rank\n{row.target_rank}", fill=colour, font=font)
    return sheet


def _sheet_signature(out_dir: Path) -> tuple[bytes, ...]:
    """What marks the contact sheet in `out_dir` as a report's: its text chunk, or (a sheet written before the chunk)
    being a PNG beside a report page."""
    page = out_dir / HTML_FILE
    beside_a_page = page.is_file() and not page.is_symlink() and any(
        signature in page.read_bytes()[:65536] for signature in HTML_SIGNATURE)
    return (SHEET_SIGNATURE, PNG_MAGIC) if beside_a_page else (SHEET_SIGNATURE,)


def check_report_dir(out_dir: str | os.PathLike, protect=()) -> None:
    """Raise `storage.OutputFileError` unless [`write_report`] may write into `out_dir` (before the work)."""
    out_dir = Path(out_dir)
    check_output_file(out_dir / HTML_FILE, HTML_SIGNATURE, "retrieval report page", protect)
    check_output_file(out_dir / SHEET_FILE, _sheet_signature(out_dir), "retrieval report sheet", protect)


def write_page(path: str | os.PathLike, page: str, protect=()) -> Path:
    """Write a page of [`render_html`] to `path` by the project's output-file rule (`storage.write_output_file`:
    never over an input, an index's files or any file that is not such a page)."""
    return write_output_file(path, page.encode(), HTML_SIGNATURE, "retrieval page", protect)


def sheet_png(sheet) -> bytes:
    """A contact sheet as PNG bytes, carrying the signature of this module's outputs."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", GENERATOR)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG", optimize=True, pnginfo=info)
    return buffer.getvalue()


def write_report(out_dir: str | os.PathLike, rows: Sequence[ReportRow], title: str, notes: str = "",
                 thumb_size: int = 112) -> dict[str, Path]:
    """Write `retrieval_report.html` and `retrieval_report.png` into `out_dir` (each atomically, each replacing only
    a previous report: `check_report_dir`)."""
    out_dir = Path(out_dir)
    check_report_dir(out_dir)
    signature = _sheet_signature(out_dir)  # before the page is replaced
    page = write_page(out_dir / HTML_FILE, render_html(rows, title, notes, thumb_size))
    sheet = write_output_file(out_dir / SHEET_FILE, sheet_png(contact_sheet(rows, thumb_size=min(thumb_size, 96))),
                              signature, "retrieval report sheet")
    return {"html": page, "png": sheet}


def spread(n: int, count: int) -> list[int]:
    """`count` row numbers spread evenly over `range(n)` (all of them when `count >= n`), first and last included."""
    if count >= n:
        return list(range(n))
    if count <= 1:
        return [0][:count]
    return sorted({round(i * (n - 1) / (count - 1)) for i in range(count)})


def evaluation_rows(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    gallery_ids: Sequence[str],
    reference_ids: Sequence[str],
    target_ids: Sequence[Sequence[str]],
    texts: Sequence[str],
    open_images,
    similarity,
    rows: Sequence[int],
    top_k: int = 10,
    remove_reference: bool = True,
    allowed: Sequence[Sequence[int]] | None = None,
    query_ids: Sequence[str] | None = None,
) -> list[ReportRow]:
    """
    The report rows of the queries `rows`.

    Args:
        queries: `[N, D]` composed queries; gallery: `[M, ...]` target embeddings of `gallery_ids`.
        target_ids: per query, its ground-truth target ids (empty on test splits).
        open_images: `ids -> PIL images` (e.g. `ImageStore.images`).
        similarity: the model's scoring rule.
        rows: which queries to show.
        remove_reference: leave each query's reference out of its ranking (as the protocol does).
        allowed: per query, the gallery rows it is ranked against (FashionIQ's category galleries), or None (all).
    """
    position = {image_id: i for i, image_id in enumerate(gallery_ids)}
    out = []
    for row in rows:
        candidates = torch.as_tensor(allowed[row] if allowed is not None else range(len(gallery_ids)),
                                     dtype=torch.long)
        local = {int(g): j for j, g in enumerate(candidates.tolist())}
        reference = position.get(reference_ids[row])
        excluded = local.get(reference) if remove_reference and reference is not None else None
        targets = [t for t in target_ids[row] if t is not None]
        target_local = {t: local[position[t]] for t in targets if t in position and position[t] in local
                        and local[position[t]] != excluded}
        # One scoring pass of the query against its gallery: the top k, their scores and the targets' ranks.
        ranked = rank_topk(queries[row : row + 1], gallery[candidates], top_k, similarity=similarity,
                           exclude=None if excluded is None else torch.tensor([excluded]),
                           rank_of=torch.tensor([list(target_local.values())], dtype=torch.long))
        ranks = dict(zip(target_local, ranked.ranks[0].tolist()))
        shown = [int(candidates[j]) for j in ranked.indices[0].tolist()]
        images = open_images([gallery_ids[g] for g in shown])
        hits = [ReportHit(gallery_ids[g], score, image, r + 1, gallery_ids[g] in target_local)
                for r, (g, score, image) in enumerate(zip(shown, ranked.scores[0].tolist(), images))]
        missed = [(t, open_images([t])[0], rank) for t, rank in sorted(ranks.items(), key=lambda x: x[1])
                  if rank > len(hits)]
        out.append(ReportRow(
            text=texts[row], hits=hits, reference_id=reference_ids[row],
            reference_image=open_images([reference_ids[row]])[0], target_ids=targets,
            target_rank=min(ranks.values()) if ranks else None, missed_targets=missed,
            query_id=query_ids[row] if query_ids is not None else None,
        ))
    return out


__all__ = ["HTML_SIGNATURE", "ReportHit", "ReportRow", "check_report_dir", "contact_sheet", "evaluation_rows",
           "hit_figure", "render_html", "report_css", "spread", "thumbnail", "write_page", "write_report"]
