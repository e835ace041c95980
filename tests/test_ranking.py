"""The one ranker: its indices follow the tie rule (the item listed first), its scores are the model's similarity of
the items it returns, and the ranks it gives of asked-for items are their places in the whole ranking — all from
one scoring pass, whatever the chunking."""

import torch
from conftest import brute_force_topk, tiny_model

from modeling_spn4cir.cir_contract import max_token_similarity
from modeling_spn4cir.retrieval import rank_candidates, rank_topk


def _gallery_with_ties(n=40, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    gallery = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)
    gallery[17] = gallery[5]  # exact ties: the lower index ranks first
    gallery[30] = gallery[5]
    queries = torch.nn.functional.normalize(torch.randn(7, dim, generator=g), dim=-1)
    queries[0] = gallery[5]
    return queries, gallery


def test_scores_are_the_models_similarity_of_the_returned_items():
    model = tiny_model().eval()
    torch.manual_seed(1)
    with torch.no_grad():
        gallery = model.get_target_embeds(torch.randn(23, 3, 32, 32))
        queries = model.get_target_embeds(torch.randn(5, 3, 32, 32))
        full = model.similarity(queries, gallery).float()
    exclude = torch.tensor([3, 0, 22, 7, 7])
    for chunk_size in (2, 512):
        ranked = rank_topk(queries, gallery, 6, similarity=model.similarity, exclude=exclude, chunk_size=chunk_size)
        masked = full.clone()
        masked[torch.arange(5), exclude] = float("-inf")
        assert ranked.indices.tolist() == brute_force_topk(masked, 6)
        assert ranked.scores.dtype == torch.float32 and ranked.ranks is None
        torch.testing.assert_close(ranked.scores, full.gather(1, ranked.indices), rtol=0, atol=1e-6)
    # Multi-vector targets [M, Q, D] (SPRC's rule: the max over target tokens).
    tokens = torch.nn.functional.normalize(torch.randn(15, 4, queries.shape[1]), dim=-1)
    ranked = rank_topk(queries, tokens, 4, similarity=max_token_similarity, chunk_size=3)
    scores = max_token_similarity(queries, tokens)
    assert ranked.indices.tolist() == brute_force_topk(scores, 4)
    torch.testing.assert_close(ranked.scores, scores.gather(1, ranked.indices), rtol=0, atol=1e-6)


def test_ranks_of_asked_items_are_their_places_in_the_whole_ranking():
    queries, gallery = _gallery_with_ties()
    full = queries @ gallery.T
    exclude = torch.tensor([30, 1, 2, 3, 4, 5, 6])
    asked = torch.tensor([[5, 17, 30, 39]] * 7)  # tied items, one excluded for query 0, items below the top k
    ranked = rank_topk(queries, gallery, 3, exclude=exclude, chunk_size=3, rank_of=asked)
    masked = full.clone()
    masked[torch.arange(7), exclude] = float("-inf")
    order = brute_force_topk(masked, gallery.shape[0])
    expected = [[0 if j == int(e) else order[i].index(j) + 1 for j in row.tolist()]
                for i, (row, e) in enumerate(zip(asked, exclude))]
    assert ranked.ranks.tolist() == expected
    assert ranked.ranks[0].tolist()[:3] == [1, 2, 0]  # 5 and 17 tie: the one listed first ranks higher
    # Asking for ranks changes nothing else.
    plain = rank_topk(queries, gallery, 3, exclude=exclude, chunk_size=3)
    assert torch.equal(plain.indices, ranked.indices) and torch.equal(plain.scores, ranked.scores)


def test_ranks_are_asked_for_even_below_a_depth_of_zero():
    queries, gallery = _gallery_with_ties()
    gallery = gallery[:1]
    ranked = rank_topk(queries, gallery, 5, exclude=torch.zeros(7, dtype=torch.long),
                       rank_of=torch.zeros(7, 1, dtype=torch.long))
    assert ranked.indices.shape == ranked.scores.shape == (7, 0)
    assert ranked.ranks.tolist() == [[0]] * 7


def test_rank_candidates_orders_each_set_with_its_scores():
    queries, gallery = _gallery_with_ties()
    sets = torch.tensor([[30, 17, 5, 2, 9]] * 7)
    ranked = rank_candidates(queries, gallery, sets, chunk_size=2)
    full = queries @ gallery.T
    restricted = full.gather(1, sets.sort(dim=1).values)
    expected = [[sorted(s.tolist())[j] for j in row] for s, row in zip(sets, brute_force_topk(restricted, 5))]
    assert ranked.indices.tolist() == expected
    assert ranked.indices[0, :3].tolist() == [5, 17, 30]
    torch.testing.assert_close(ranked.scores, full.gather(1, ranked.indices), rtol=0, atol=1e-6)
