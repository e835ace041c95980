"""The retrieval report: the evaluator's report shows the protocol's ranking (the reference removed, the targets
marked in or after the top k with their rank), and `evaluation_rows` gives the ranking's own scores and the ranks of
targets below the top k (ties to the image listed first) within a query's gallery."""

import base64
import io
from html.parser import HTMLParser

import datasets
import pytest
import torch
from conftest import brute_force_topk, solid_images, tiny_model, tiny_tokenizer

from modeling_spn4cir import CLIP4CIRImageProcessor
from modeling_spn4cir.retrieval import evaluation_rows

TEXTS = ["make it blue", "red circle", "and more"]


class _Page(HTMLParser):
    """Sections (queries) with their hit figures, targets and image sources."""

    def __init__(self):
        super().__init__()
        self.sections = []

    @classmethod
    def parse(cls, text):
        page = cls()
        page.feed(text)
        return page

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag == "section" and "query" in classes:
            self.sections.append({"hits": [], "targets": [], "images": [], "rank": attrs.get("data-target-rank")})
        elif tag == "figure" and self.sections:
            if "hit" in classes:
                self.sections[-1]["hits"].append(attrs)
            if "target" in classes:
                self.sections[-1]["targets"].append(attrs)
        elif tag == "img" and self.sections:
            self.sections[-1]["images"].append(attrs["src"])


def _decodes(src: str) -> bool:
    from PIL import Image

    assert src.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).size[0] > 0


def test_evaluator_report_shows_queries_hits_and_marks_targets(tmp_path):
    from PIL import Image

    from trainers.evaluation import CIREvaluator

    model = tiny_model().eval()
    ids = [f"img{i}" for i in range(10)]
    corpus = datasets.Dataset.from_dict({"image_id": ids, "image": solid_images(10)}, features=datasets.Features(
        {"image_id": datasets.Value("string"), "image": datasets.Image()}))
    triplets = datasets.Dataset.from_dict({"reference_id": [f"img{i}" for i in range(5)],
                                           "target_id": [f"img{(i + 3) % 10}" for i in range(5)],
                                           "modification_texts": [[TEXTS[i % 3]] for i in range(5)]})
    tokenizer = tiny_tokenizer(TEXTS)
    evaluator = CIREvaluator(corpus, triplets, CLIP4CIRImageProcessor(size=32), tokenizer, protocol="recall",
                             show_progress_bar=False, report_dir=str(tmp_path / "report"), report_queries=3,
                             report_top_k=4, split="toy val", model_name="out/run (trained from tiny)")
    metrics = evaluator(model)
    text = (tmp_path / "report" / "retrieval_report.html").read_text()
    assert "<h1>Retrieval report: out/run (trained from tiny), toy val split</h1>" in text  # the trained model
    page = _Page.parse(text)
    assert len(page.sections) == 3
    # Queries 0, 2, 4 (spread evenly): recompute their full rankings with the reference removed.
    processor = CLIP4CIRImageProcessor(size=32)
    with torch.no_grad():
        pixels = processor(list(corpus["image"]))["pixel_values"]
        gallery, features = model.get_target_embeds_and_reference_features(pixels)
        tokens = tokenizer([TEXTS[i % 3] for i in (0, 2, 4)], padding=True, return_tensors="pt")
        queries = model.get_query_embeds(tokens["input_ids"], tokens["attention_mask"],
                                         reference_features=features[[0, 2, 4]])
        scores = model.similarity(queries, gallery)
    ranks = []
    for section, row, q in zip(page.sections, scores, (0, 2, 4)):
        row = row.clone()
        row[q] = float("-inf")
        order = brute_force_topk(row[None], 10)[0]
        assert [f["data-image-id"] for f in section["hits"]] == [ids[j] for j in order[:4]]
        target = (q + 3) % 10
        ranks.append(order.index(target) + 1)
        assert int(section["rank"]) == ranks[-1]
        assert [t["data-image-id"] for t in section["targets"]] == [ids[target]]  # marked in or after the top 4
        assert all(_decodes(src) for src in section["images"]) and len(section["images"]) == 4 + 1 + (ranks[-1] > 4)
    assert metrics["recall@1"] >= 0
    sheet = Image.open(tmp_path / "report" / "retrieval_report.png")
    assert sheet.height > 3 * 96 and sheet.width > 4 * 96




def test_rows_show_the_rankings_scores_and_the_ranks_of_targets_below_the_top_k():
    """A category gallery (`allowed`), several targets (one of them the reference, which is not ranked), exact
    ties: the hits, their scores and the targets' ranks are those of the brute-force ranking of that gallery."""
    from PIL import Image

    g = torch.Generator().manual_seed(4)
    gallery = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=-1)
    gallery[21] = gallery[9]  # a tie inside the first query's category gallery
    queries = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=-1)
    queries[0] = gallery[9]
    ids = [f"g{i}" for i in range(30)]
    allowed = [list(range(0, 30, 3)), list(range(1, 30, 3)), list(range(30))]  # g9 and g21 are in category 0
    targets = [["g21", "g0", "g27"], ["g4", "g28"], ["g5"]]
    references = ["g0", "g1", "g2"]
    opened = []

    def open_images(names):
        opened.extend(names)
        return [Image.new("RGB", (4, 4)) for _ in names]

    rows = evaluation_rows(queries, gallery, ids, references, targets, ["a", "b", "c"], open_images,
                           lambda q, t: q @ t.T, [0, 1, 2], top_k=2, remove_reference=True, allowed=allowed)
    scores = queries @ gallery.T
    for row, members, wanted, reference, q in zip(rows, allowed, targets, references, range(3)):
        local = scores[q, members].clone()
        local[members.index(int(reference[1:]))] = float("-inf")
        order = [members[j] for j in brute_force_topk(local[None], len(members))[0]]
        assert [h.image_id for h in row.hits] == [ids[j] for j in order[:2]]
        assert [h.score for h in row.hits] == pytest.approx(scores[q, order[:2]].tolist(), abs=1e-6)
        ranks = {t: order.index(int(t[1:])) + 1 for t in wanted if t != reference}
        assert row.target_rank == min(ranks.values())
        assert [(t, r) for t, _, r in row.missed_targets] == sorted(((t, r) for t, r in ranks.items() if r > 2),
                                                                   key=lambda x: x[1])
    assert rows[0].hits[0].image_id == "g9" and rows[0].hits[1].image_id == "g21"  # the tie: listed first wins
    assert rows[0].hits[1].is_target and rows[0].target_rank == 2
    assert "g0" not in [t for t, _, _ in rows[0].missed_targets]  # the reference is no rankable target


def _green_frames(sheet, y: int) -> int:
    """Thumbnails framed green along the row of pixels `y`: runs of the target colour at least a thumbnail wide."""
    from modeling_spn4cir.retrieval.report import TARGET_COLOUR

    runs, run = 0, 0
    for x in range(sheet.width):
        run = run + 1 if sheet.getpixel((x, y)) == TARGET_COLOUR else 0
        runs += run == 40
    return runs


def test_the_contact_sheet_shows_the_targets_below_the_top_k_as_the_page_does():
    from PIL import Image

    from modeling_spn4cir.retrieval import ReportHit, ReportRow
    from modeling_spn4cir.retrieval.report import contact_sheet

    images = [Image.new("RGB", (64, 64), (40 * i, 90, 200)) for i in range(6)]
    hits = [ReportHit(f"g{i}", 0.9 - 0.1 * i, images[i], i + 1, is_target=i == 1) for i in range(4)]
    shown = ReportRow("make it blue", hits, "ref", images[5], ["g1"], target_rank=2)
    missed = ReportRow("make it red", [ReportHit(f"g{i}", 0.5, images[i], i + 1) for i in range(4)], "ref", images[5],
                       ["g4", "g5"], target_rank=7, missed_targets=[("g4", images[4], 7), ("g5", images[5], 12)])
    alone = contact_sheet([shown], thumb_size=48)
    both = contact_sheet([shown, missed], thumb_size=48)
    assert _green_frames(alone, 6) == 1  # the frame's top edge (pad 6): the one target in the top 4
    assert _green_frames(both, 6) == 1 and _green_frames(both, 6 + 48 + 6 + 20 + 6) == 2  # both missed targets
    assert both.width > alone.width  # room for them after the top k

