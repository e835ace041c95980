"""How `cir_texts.json` and `clip_bpe/` were made (run once; needs files outside the project).

    python -m benchmarks.data.make_text_sample --annotations ../shared/cir_annotations \\
        --bpe ../ref/spn4cir/clip4cir/clip/bpe_simple_vocab_16e6.txt.gz

- `cir_texts.json`: `{"fashioniq": [[c0, c1], ...], "cirr": [c, ...]}`, real modification texts drawn with seed 0:
  512 caption pairs from each FashionIQ category (dress train, shirt val, toptee val: `cap.*.json`, CDLA) and 512
  CIRR captions (`cap.rc2.{val,test1}.json`, MIT).
- `clip_bpe/vocab.json`, `clip_bpe/merges.txt`: OpenAI CLIP's BPE (`bpe_simple_vocab_16e6.txt.gz`, MIT) cut down to
  the merges these texts use and the tokens they produce or pass through, with CLIP's token ids: `transformers.CLIPTokenizer` over it
  gives every text of the sample (each FashionIQ join included) the same ids as the full tokenizer. Keeping only the
  merges BPE applies changes no result: each step of BPE applies the lowest-ranked merge present, which is kept, and
  the dropped merges were never the lowest present.
"""

import argparse
import gzip
import itertools
import json
import random
from pathlib import Path

HERE = Path(__file__).parent
STRIP = ".?, "


def _byte_symbols() -> list[str]:
    """CLIP's byte -> printable character table, in CLIP's order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    codes = dict(zip(printable + others, printable + [256 + i for i in range(len(others))]))
    return [chr(codes[b]) for b in printable + others]


def full_clip_bpe(bpe_path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    with gzip.open(bpe_path) as f:
        merges = [tuple(line.split()) for line in f.read().decode("utf-8").split("\n")[1:48895]]
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(vocab, merges):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=vocab, merges=[tuple(m) for m in merges], model_max_length=77)


def used_merges(words: set[str], ranks: dict[tuple[str, str], int]) -> set[tuple[str, str]]:
    """The merges BPE applies to `words` (byte-level words, the last symbol ending in `</w>`)."""
    used = set()
    for word in words:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = [(ranks.get(p, float("inf")), i) for i, p in enumerate(itertools.pairwise(parts))]
            rank, i = min(pairs)
            if rank == float("inf"):
                break
            used.add((parts[i], parts[i + 1]))
            parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return used


def sample(annotations: Path, seed: int = 0, per_category: int = 512, cirr: int = 512) -> dict:
    rng = random.Random(seed)
    fiq = []
    for name in ("cap.dress.train.json", "cap.shirt.val.json", "cap.toptee.val.json"):
        rows = json.loads((annotations / "fashioniq" / name).read_text())
        fiq += [list(r["captions"][:2]) for r in rng.sample(rows, per_category)]
    captions = [r["caption"] for name in ("cap.rc2.val.json", "cap.rc2.test1.json")
                for r in json.loads((annotations / "cirr" / name).read_text())]
    return {"fashioniq": fiq, "cirr": rng.sample(captions, cirr)}


def all_texts(texts: dict) -> list[str]:
    """Every text the trainer can tokenize from the sample: FashionIQ's four joins, CIRR's captions."""
    out = list(texts["cirr"])
    for c0, c1 in texts["fashioniq"]:
        c0, c1 = c0.strip(STRIP), c1.strip(STRIP)
        out += [f"{c0} and {c1}", f"{c1} and {c0}", c0, c1]
    return out


def main(annotations: Path, bpe: Path) -> None:
    texts = sample(annotations)
    vocab, merges = full_clip_bpe(bpe)
    full = clip_tokenizer(vocab, merges)
    strings = all_texts(texts)
    backend = full.backend_tokenizer
    words = {w for s in strings for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(s))}
    kept = used_merges(words, {m: i for i, m in enumerate(merges)})
    expected = full(strings)["input_ids"]
    tokens = {full.convert_ids_to_tokens(i) for ids in expected for i in ids}
    sub_merges = [m for m in merges if m in kept]
    tokens |= {t for m in sub_merges for t in (*m, "".join(m))} | {"<|startoftext|>", "<|endoftext|>"}
    sub_vocab = {t: i for t, i in vocab.items() if t in tokens}  # with the merges' parts, as tokenizers' BPE needs
    assert clip_tokenizer(sub_vocab, sub_merges)(strings)["input_ids"] == expected
    out = HERE / "clip_bpe"
    out.mkdir(exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(sub_vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("\n".join(" ".join(m) for m in sub_merges) + "\n")
    (HERE / "cir_texts.json").write_text(json.dumps(texts, ensure_ascii=False, indent=0))
    print(f"{len(texts['fashioniq'])} FashionIQ pairs, {len(texts['cirr'])} CIRR captions; "
          f"{len(sub_vocab)} tokens, {len(sub_merges)} merges")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", type=Path, required=True)
    parser.add_argument("--bpe", type=Path, required=True)
    args = parser.parse_args()
    main(args.annotations, args.bpe)
