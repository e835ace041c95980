"""An image collection without annotations (a folder, webdataset shards, a Parquet or image-folder dataset) becomes a
corpus in the project schema, and `generate_triplets.py --pool corpus` captions and pairs it (zero-shot CIR data)."""

import io
import json
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from datasets_scripts.image_checks import BadImageError
from datasets_scripts.images import build_images
from datasets_scripts.images import main as images_main
from datasets_scripts.load import load_cir_data
from modeling_spn4cir.storage import OutputDirError


def _image(seed: int, fmt="PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def _folder(root: Path, names) -> Path:
    for seed, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(_image(seed, "JPEG" if name.lower().endswith((".jpg", ".jpeg")) else "PNG"))
    return root


def _webdataset(directory: Path, shards=2, per_shard=4) -> Path:
    """webdataset shards as CC3M's: `<key>.jpg`, `<key>.txt` (the alt text), `<key>.json` per sample."""
    directory.mkdir(parents=True)
    for s in range(shards):
        with tarfile.open(directory / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                for ext, payload in (("jpg", _image(10 * s + i, "JPEG")), ("txt", f"photo {key}".encode()),
                                     ("json", json.dumps({"key": key}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return directory


def _corpus(out):
    return datasets.load_dataset(str(out), "corpus", split="train")


FOLDER = ["a/1.png", "a/b/2.JPG", "c.jpeg", "d.png", "e/3.webp.png", "f.png"]


# ------------------------------------------------------------------------------------------------ folders
def test_a_folder_becomes_a_corpus_of_its_images_ids_relative_paths(tmp_path):
    root = _folder(tmp_path / "photos", FOLDER)
    (root / "notes.txt").write_text("not an image")
    out = build_images(root, tmp_path / "out")
    corpus = _corpus(out)
    assert corpus["image_id"] == sorted(FOLDER)
    assert corpus[0]["image"].size == (12, 10) and np.array_equal(
        np.asarray(corpus[corpus["image_id"].index("d.png")]["image"]), np.asarray(Image.open(root / "d.png")))
    assert datasets.get_dataset_config_names(str(out)) == ["corpus"]  # no annotated triplets
    card = (out / "README.md").read_text()
    assert "from `photos` (a folder of 6 images)" in card and "every image" in card
    assert "paths relative to the folder" in card and "--pool corpus" in card
    data = load_cir_data(str(out))
    assert len(data.triplets) == 0 and len(data.corpus["train"]) == 6


def test_limit_takes_a_reproducible_random_sample_in_source_order(tmp_path):
    root = _folder(tmp_path / "photos", [f"img{i:02d}.png" for i in range(20)])
    samples = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        samples[name] = _corpus(build_images(root, tmp_path / name, limit=5, seed=seed))["image_id"]
    assert samples["a"] == samples["b"] != samples["c"]
    assert all(len(s) == 5 and s == sorted(s) for s in samples.values())
    assert "a random sample (seed 1) of 5 of 20 images" in (tmp_path / "a" / "README.md").read_text()
    assert len(_corpus(build_images(root, tmp_path / "all", limit=50))) == 20


def test_unreadable_images_are_named_or_left_out_and_an_empty_collection_is_an_error(tmp_path):
    root = _folder(tmp_path / "photos", ["a.png", "b.png", "c.png"])
    (root / "b.png").write_bytes(_image(1)[:40])  # truncated
    with pytest.raises(BadImageError, match=r"1 image file\(s\) cannot be used: .*'b\.png' does not decode.*"
                                            "--skip_bad_images"):
        build_images(root, tmp_path / "out")
    out = build_images(root, tmp_path / "out", skip_bad_images=True)
    assert _corpus(out)["image_id"] == ["a.png", "c.png"]
    assert "left out with --skip_bad_images" in (out / "README.md").read_text()
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=rf"No image file \(.png, .jpg.*under {empty} \(searched recursively\)"
                                                ".*--image_column"):
        build_images(empty, tmp_path / "out2")
    broken = _folder(tmp_path / "broken", ["x.png", "y.jpg"])
    for name in ("x.png", "y.jpg"):
        (broken / name).write_bytes(b"not an image")
    with pytest.raises(ValueError, match=rf"No image of {broken} can be read \(2 tried.*Check that --images names"):
        build_images(broken, tmp_path / "out3", skip_bad_images=True)


def test_outputs_are_safe(tmp_path):
    root = _folder(tmp_path / "photos", ["a.png"])
    with pytest.raises(OutputDirError, match="inside the collection"):
        build_images(root, root / "corpus")
    with pytest.raises(OutputDirError, match="is or contains the input"):
        build_images(root, tmp_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    with pytest.raises(OutputDirError, match="not empty"):
        build_images(root, tmp_path / "taken")
    out = build_images(root, tmp_path / "out")
    with pytest.raises(OutputDirError, match="--overwrite_output_dir"):
        build_images(root, out)
    assert build_images(root, out, overwrite_output_dir=True) == out


# ----------------------------------------------------------------------------------------------- datasets
def test_webdataset_shards_keys_as_ids_alt_texts_as_captions(tmp_path):
    shards = _webdataset(tmp_path / "cc3m")
    images_main(["--images", str(shards), "--output_dir", str(tmp_path / "out"), "--caption_column", "txt",
                 "--limit", "5", "--seed", "3"])
    corpus = _corpus(tmp_path / "out")
    assert len(corpus) == 5 and all(c == f"photo {i}" for i, c in zip(corpus["image_id"], corpus["caption"]))
    assert set(corpus["image_id"]) <= {f"{s:05d}{i:04d}" for s in range(2) for i in range(4)}
    key = corpus["image_id"][0]
    with tarfile.open(shards / f"{key[:5]}.tar") as tar:
        assert corpus.cast_column("image", datasets.Image(decode=False))[0]["image"]["bytes"] == \
            tar.extractfile(f"{key}.jpg").read()
    assert "Image ids: column '__key__'" in (tmp_path / "out" / "README.md").read_text()
    one = build_images(shards / "00001.tar", tmp_path / "one")  # a single shard file
    assert _corpus(one)["image_id"] == [f"00001{i:04d}" for i in range(4)]


def test_a_parquet_dataset_its_columns_checked(tmp_path):
    features = datasets.Features({"picture": datasets.Image(), "thumb": datasets.Image(),
                                  "name": datasets.Value("string"), "label": datasets.Value("int64")})
    rows = {"picture": [{"bytes": _image(i), "path": None} for i in range(4)],
            "thumb": [{"bytes": _image(9), "path": None}] * 4, "name": ["n0", "n1", "n2", "n2"], "label": [0, 1, 2, 3]}
    (tmp_path / "pq").mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "pq" / "train.parquet"))
    with pytest.raises(ValueError, match=r"the image columns \['picture', 'thumb'\].*pass --image_column"):
        build_images(tmp_path / "pq", tmp_path / "o1")
    with pytest.raises(ValueError, match=r"no column 'photo' \(--image_column\); its columns are \['picture', 'thumb', "
                                         r"'name', 'label'\]"):
        build_images(tmp_path / "pq", tmp_path / "o2", image_column="photo")
    with pytest.raises(ValueError, match=r"column 'label' holds Value\('int64'\), not images; its image columns are"):
        build_images(tmp_path / "pq", tmp_path / "o3", image_column="label")
    with pytest.raises(ValueError, match=r"id column 'name' has repeated or empty values \(first: \['n2'\]\)"):
        build_images(tmp_path / "pq", tmp_path / "o4", image_column="picture", id_column="name")
    out = build_images(tmp_path / "pq", tmp_path / "o5", image_column="picture")
    corpus = _corpus(out)
    assert corpus["image_id"] == ["0", "1", "2", "3"]  # the row index
    assert corpus.cast_column("image", datasets.Image(decode=False))[2]["image"]["bytes"] == _image(2)
    assert "Image ids: the row index in the split" in (out / "README.md").read_text()


def test_an_image_folder_dataset_read_as_a_dataset(tmp_path):
    root = _folder(tmp_path / "imf", ["train/x.png", "train/y.png"])
    (root / "train" / "metadata.csv").write_text("file_name,image_id\nx.png,first\ny.png,second\n")
    corpus = _corpus(build_images(root, tmp_path / "out", image_column="image"))
    assert sorted(corpus["image_id"]) == ["first", "second"]  # its image_id column
    with pytest.raises(ValueError, match="--id_column, --caption_column and --split apply to datasets"):
        build_images(root, tmp_path / "out2", id_column="image_id")


# --------------------------------------------------------------------------------- generate_triplets.py
def test_generate_triplets_captions_and_pairs_a_collection(tmp_path):
    """Webdataset shards -> corpus -> column captions (the alt texts), random pairs, the CIRR templates."""
    import generate_triplets

    shards = _webdataset(tmp_path / "cc3m", shards=2, per_shard=5)
    corpus_dir = build_images(shards, tmp_path / "corpus", caption_column="txt")
    with pytest.raises(SystemExit, match=r"no annotated triplets in split 'train'.*pass --pool corpus"):
        generate_triplets.main(["--dataset", str(corpus_dir), "--output_dir", str(tmp_path / "x"),
                                "--captioner", "column", "--caption_column", "caption", "--random_pairs"])
    out = tmp_path / "scaled"
    generate_triplets.main(["--dataset", str(corpus_dir), "--pool", "corpus", "--captioner", "column",
                            "--caption_column", "caption", "--random_pairs", "--targets_per_reference", "2", "--templates", "0", "1",
                            "--tokenizer", "none", "--output_dir", str(out)])
    triplets = datasets.load_dataset(str(out), "triplets", split="train")
    ids = _corpus(corpus_dir)["image_id"]
    assert len(triplets) == 2 * len(ids) and set(triplets["reference_id"]) == set(ids)
    for row in triplets:
        assert row["reference_id"] != row["target_id"]
        ref, tgt = f"photo {row['reference_id']}", f"photo {row['target_id']}"
        assert (row["reference_caption"], row["target_caption"]) == (ref, tgt)
        assert row["modification_texts"] == [f"{tgt} instead of {ref}", f"Unlike {ref}, I want {tgt}"]


def test_generate_triplets_rank_window_with_retrieval_captions_on_a_folder(tmp_path, tiny_model_dir):
    import generate_triplets

    corpus_dir = build_images(_folder(tmp_path / "photos", [f"p{i:02d}.png" for i in range(12)]), tmp_path / "corpus")
    phrases = tmp_path / "phrases.txt"
    phrases.write_text("red circle\nblue square\n")
    out = tmp_path / "scaled"
    generate_triplets.main(["--dataset", str(corpus_dir), "--pool", "corpus", "--captioner", "retrieval",
                            "--encoder", str(tiny_model_dir), "--phrases", str(phrases), "--top_k_phrases", "1",
                            "--rank_min", "2", "--rank_max", "5", "--output_dir", str(out)])
    triplets = datasets.load_dataset(str(out), "triplets", split="train")
    assert len(triplets) == 12 and sorted(triplets["reference_id"]) == [f"p{i:02d}.png" for i in range(12)]
    assert all(2 <= r < 5 for r in triplets["pair_rank"])
    assert set(triplets["reference_caption"]) <= {"red circle", "blue square"}
    assert all(row["modification_texts"][0] == f"{row['target_caption']} instead of {row['reference_caption']}"
               for row in triplets)
