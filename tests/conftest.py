"""Shared helpers: tiny CLIP4CIR configs built in the test, nothing downloaded."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURES = Path(__file__).parent / "fixtures"


def parity_fixture(name: str):
    """`(folder, meta, tolerance)` of a parity fixture (`tests/fixtures/<name>`: the original code's inputs and
    outputs, and `meta.json` with its geometry and the tolerance of the comparison)."""
    import json

    folder = FIXTURES / name
    meta = json.loads((folder / "meta.json").read_text())
    return folder, meta, meta["tolerance"]

TINY_TEXT = dict(
    vocab_size=99,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=16,
    projection_dim=16,
    bos_token_id=97,
    eos_token_id=98,
    pad_token_id=0,
)
TINY_VIT = dict(
    model_type="clip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
    projection_dim=16,
)
TINY_RESNET = dict(model_type="clip4cir_resnet", layers=[1, 2, 1, 1], width=8, image_size=64, projection_dim=16)


def tiny_config(tower="vit", fusion="sum", **kwargs):
    from modeling_spn4cir import CLIP4CIRConfig

    vision = TINY_VIT if tower == "vit" else TINY_RESNET
    return CLIP4CIRConfig(
        text_config=dict(TINY_TEXT), vision_config=dict(vision), projection_dim=16, fusion=fusion,
        combiner_projection_dim=24, combiner_hidden_dim=40, **kwargs,
    )


def tiny_model(tower="vit", fusion="sum", seed=0, **kwargs):
    from modeling_spn4cir import CLIP4CIRModel

    torch.manual_seed(seed)
    return CLIP4CIRModel(tiny_config(tower, fusion, **kwargs))


def tiny_inputs(model, batch=3, seq=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    size = model.config.image_size
    ids = torch.randint(1, 97, (batch, seq), generator=g)
    ids[:, 0] = 97
    ids[:, -1] = 98
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch, 3, size, size, generator=g),
        "target_pixel_values": torch.randn(batch, 3, size, size, generator=g),
    }


@pytest.fixture(params=[("vit", "sum"), ("vit", "combiner"), ("resnet", "sum"), ("resnet", "combiner")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def tower_fusion(request):
    return request.param


def tiny_tokenizer(texts=("a red circle", "make it blue", "the square should be green instead")):
    """A word-level tokenizer built with `tokenizers` (no download): <pad>=0, <unk>=1, <sot>=2, <eot>=3."""
    from spn_recipe.tokenizer import train_word_tokenizer

    return train_word_tokenizer(texts, model_max_length=16)


_BLOCK_PACKAGE = """
import sys, importlib.abc
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "modeling_spn4cir":
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, _Block())
try:
    import modeling_spn4cir
    raise SystemExit("modeling_spn4cir should not be importable here")
except ImportError:
    pass
"""


def run_without_package(script: str, workdir) -> str:
    """Run `script` in a fresh Python in which `import modeling_spn4cir` fails; return its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", _BLOCK_PACKAGE + textwrap.dedent(script)], capture_output=True, text=True,
        cwd=workdir, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(Path(workdir) / "hf")},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WATCHDOG_HEADER = "Timeout ("  # what faulthandler.dump_traceback_later prints first (tests/scripts/_dist.py)


def run_two_processes(script_name: str, *args, attempts: int = 2) -> None:
    """Run `tests/scripts/<script_name> *args` under `torchrun --nproc_per_node 2` (gloo), with the repository root
    on PYTHONPATH so the children import this checkout whatever is installed, and `tests/` and `examples/` so that
    they import its helpers (`conftest`, `test_losses`) and the example scripts (`run_cir`) as the tests do (the
    `pythonpath` of setup.cfg's pytest section); fail with their output.

    The rendezvous is static on 127.0.0.1 and gloo uses the loopback interface: `--standalone` resolves the
    host's name (`getfqdn`), and one CI run hung there for 300 s with no output from the children. A hang (the
    children's watchdog fired, or the launcher's timeout) is retried once with a warning that carries the
    children's stacks; a wrong result or a crash fails at once, never retried."""
    script = Path(__file__).parent / "scripts" / script_name
    tests = Path(__file__).resolve().parent
    paths = [str(tests.parent), str(tests), str(tests.parent / "examples"), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths)),
           "SPN4CIR_TEST_WATCHDOG_S": "150"}
    if "lo" in {name for _, name in socket.if_nameindex()}:
        env["GLOO_SOCKET_IFNAME"] = "lo"
    hangs = []
    for _ in range(attempts):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), *map(str, args)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
        except subprocess.TimeoutExpired as e:
            hangs.append(f"launcher timed out after 240 s\n{e.stdout or ''}{e.stderr or ''}"[-6000:])
            continue
        output = result.stdout[-3000:] + result.stderr[-3000:]
        if result.returncode == 0:
            break
        if WATCHDOG_HEADER not in result.stderr:
            raise AssertionError(output)  # a crash or a failed check in the children
        hangs.append(result.stderr[-6000:])
    else:
        pytest.fail(f"{script_name} hung in all {attempts} attempts:\n" + "\n----\n".join(hangs))
    for hang in hangs:
        warnings.warn(f"{script_name} hung once and passed on a retry; the children's stacks:\n{hang}")


@contextlib.contextmanager
def lock_held_elsewhere(path):
    """The directory lock of `path` (`modeling_spn4cir.storage.directory_lock`) held by another live process, a forked
    child, until the block ends; yields the child's pid."""
    from modeling_spn4cir.storage import output_lock

    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: hold the lock until told to go
        try:
            with output_lock(Path(path).absolute().resolve()):
                os.write(ready_w, b"1")
                os.read(done_r, 1)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"1"
        yield pid
    finally:
        os.write(done_w, b"1")
        os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, done_r, done_w):
            os.close(fd)


def brute_force_topk(scores: torch.Tensor, k: int) -> list[list[int]]:
    """Each row of `scores` `[N, M]` sorted by score, ties by lower index, first k — written independently of the
    ranker (`modeling_spn4cir.retrieval.rank_topk`)."""
    return [sorted(range(len(row)), key=lambda j: (-float(row[j]), j))[:k] for row in scores]


LLAVA_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                  "<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
                  "{% if add_generation_prompt %}assistant: {% endif %}")


def save_tiny_llava(path, words, template=LLAVA_TEMPLATE, seed=0):
    """A randomly initialized LLaVA (tiny Llama + tiny CLIP vision tower, 32-pixel images of 16 patches), a
    word-level `tokenizers` tokenizer over `words` and a chat template (any number of images per turn), saved like
    a Hub checkpoint in `path`; returns `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(
        special_tokens=["<pad>", "<unk>", "<s>", "</s>", "<image>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", chat_template=template,
        num_additional_image_tokens=1,
    )
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16),
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def two_process_gradients(script_name: str, tmp_path) -> dict:
    """What rank 0 of `tests/scripts/<script_name> OUT` saved in OUT (gradients by run, then by parameter name)."""
    out = Path(tmp_path) / "grads.pt"
    run_two_processes(script_name, out)
    return torch.load(out, weights_only=True)


def assert_same_gradients(got: dict, expected: dict, label: str) -> None:
    """Both runs gave gradients to the same parameters, equal to 1e-5 absolute / 1e-4 relative."""
    assert set(got) == set(expected), label
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=1e-5, rtol=1e-4, msg=f"{label} {name}")


def solid_images(n, size=40, seed=0):
    """n distinct small RGB images (random blocks), deterministic."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)).resize((size, size))
            for _ in range(n)]


def write_png(path: Path, seed: int, size=(12, 9), fmt=None) -> Path:
    """A random RGB image of `size` (width, height) at `path` (parents made), deterministic in `seed`."""
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def dump_json(path: Path, obj) -> Path:
    """`obj` as JSON at `path` (parents made): annotation files of the official layouts."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def write_pairs_csv(path: Path, rows, encoding="utf-8") -> Path:
    """A custom-converter CSV (`reference,text,target`) of `rows`."""
    import csv

    with open(path, "w", newline="", encoding=encoding) as f:
        writer = csv.writer(f)
        writer.writerow(["reference", "text", "target"])
        writer.writerows(rows)
    return path


def tiny_cirr_layout(root: Path, records=None) -> Path:
    """A CIRR val split of 3 images (8x8) and one query (or `records`) in the official layout under `root`."""
    paths = {f"dev-0-0-img{i}": f"./dev/dev-0-0-img{i}.png" for i in range(3)}
    for i, relative in enumerate(paths.values()):
        write_png(root / relative, i, size=(8, 8))
    dump_json(root / "cirr" / "image_splits" / "split.rc2.val.json", paths)
    dump_json(root / "cirr" / "captions" / "cap.rc2.val.json", records if records is not None else [
        {"pairid": 0, "reference": "dev-0-0-img0", "target_hard": "dev-0-0-img1", "caption": "add a dog",
         "img_set": {"id": 0, "members": list(paths)}}])
    return root


def tiny_circo_layout(root: Path, val=None, images=(12, 13, 14), test=None) -> Path:
    """CIRCO's official layout under `root`: COCO unlabeled2017 JPEGs (8x8) of the ids `images`,
    `annotations/val.json` (one query with two ground truths, or `val`) and, given `test`, `annotations/test.json`."""
    if test is not None:
        dump_json(root / "annotations" / "test.json", test)
    for i, coco_id in enumerate(images):
        write_png(root / "unlabeled2017" / f"{coco_id:012d}.jpg", i, size=(8, 8), fmt="JPEG")
    dump_json(root / "annotations" / "val.json", val if val is not None else [
        {"id": 0, "reference_img_id": 12, "target_img_id": 13, "gt_img_ids": [13, 14], "relative_caption": "is red",
         "shared_concept": "a car"}])
    return root


# ------------------------------------------ tiny official layouts (FashionIQ, CIRR) and a tiny CLIP4CIR to run on them
@pytest.fixture
def fiq_root(tmp_path):
    """FashionIQ layout: per category 6 train images, 2 train triplets (so 2 images in no triplet), 4 val images and
    2 val triplets; dress image D3 has the same pixels as D1 (a duplicate the de-duplication must merge)."""
    root = tmp_path / "fiq"
    seed = 0
    for cat, p in (("dress", "D"), ("shirt", "S"), ("toptee", "T")):
        train = [f"{p}{i}" for i in range(6)]
        val = [f"{p}V{i}" for i in range(4)]
        test = [f"{p}X0"]
        dump_json(root / "image_splits" / f"split.{cat}.train.json", train)
        dump_json(root / "image_splits" / f"split.{cat}.val.json", val)
        dump_json(root / "image_splits" / f"split.{cat}.test.json", test)
        dump_json(root / "captions" / f"cap.{cat}.train.json", [
            {"candidate": train[0], "target": train[1], "captions": ["is red", "is longer"]},
            {"candidate": train[2], "target": train[3], "captions": ["is blue", "has buttons"]}])
        dump_json(root / "captions" / f"cap.{cat}.val.json", [
            {"candidate": val[0], "target": val[1], "captions": ["is green", "shorter"]},
            {"candidate": val[2], "target": val[3], "captions": ["is black", "no sleeves"]}])
        dump_json(root / "captions" / f"cap.{cat}.test.json", [{"candidate": test[0], "captions": ["a", "b"]}])
        for image_id in train + val + test:
            seed += 1
            write_png(root / "images" / f"{image_id}.png", seed, size=(16, 16))
    (root / "images" / "D3.png").write_bytes((root / "images" / "D1.png").read_bytes())
    return root


@pytest.fixture
def cirr_root(tmp_path):
    """CIRR layout: the real val / test1 records (tests/fixtures/annotations) with generated images, and a 6-image
    train split with 4 triplets."""
    real = json.loads((FIXTURES / "annotations" / "real_records.json").read_text())
    root = tmp_path / "cirr_root"
    for split in ("val", "test1"):
        paths = real[f"cirr_{split}_paths"]
        dump_json(root / "cirr" / "captions" / f"cap.rc2.{split}.json", real[f"cirr_{split}"])
        dump_json(root / "cirr" / "image_splits" / f"split.rc2.{split}.json", paths)
        for i, relative in enumerate(paths.values()):
            write_png(root / relative, 100 + i + (50 if split == "test1" else 0), size=(16, 16))
    names = [f"train-{i}-0-img0" for i in range(6)]
    dump_json(root / "cirr" / "image_splits" / "split.rc2.train.json", {n: f"./train/1/{n}.png" for n in names})
    dump_json(root / "cirr" / "captions" / "cap.rc2.train.json", [
        {"pairid": i, "reference": names[i], "target_hard": names[i + 1], "caption": "add a dog",
         "img_set": {"id": i, "members": names[:6]}} for i in range(4)])
    for i, n in enumerate(names):
        write_png(root / "train" / "1" / f"{n}.png", 7 + i, size=(16, 16))
    return root


@pytest.fixture
def tiny_vit_dir(tmp_path):
    """A saved tiny CLIP4CIR (ViT, sum fusion) whose tokenizer knows the tiny layouts' texts."""
    from modeling_spn4cir import CLIP4CIRImageProcessor, CLIP4CIRProcessor

    model = tiny_model("vit", "sum")
    model.config.text_config.eos_token_id = model.text_model.eos_token_id = 3
    processor = CLIP4CIRProcessor(image_processor=CLIP4CIRImageProcessor(size=32),
                                  tokenizer=tiny_tokenizer(["is red", "add a dog", "and more"]))
    model.save_pretrained(tmp_path / "vit")
    processor.save_pretrained(tmp_path / "vit")
    return tmp_path / "vit"


@pytest.fixture
def custom_tree(tmp_path):
    """imgs/{a,b,c}.png (8x8) and pairs.csv (two train triplets): the custom converter's input."""
    for i, name in enumerate("abc"):
        write_png(tmp_path / "imgs" / f"{name}.png", i, size=(8, 8))
    write_pairs_csv(tmp_path / "pairs.csv", [("a", "make it blue", "b"), ("b", "add a cat", "c")])
    return tmp_path


def build_custom_tree(root: Path, out: Path, **kw):
    """The custom converter run on a `custom_tree`."""
    from datasets_scripts.custom import build_custom

    return build_custom(root / "imgs", root / "pairs.csv", out, **kw)


@pytest.fixture
def tiny_cir_dataset(tmp_path):
    """A dataset directory in the project schema: 24 images, train (16 triplets) and val (8) splits."""
    import csv

    from datasets_scripts.custom import build_custom

    images = tmp_path / "images"
    images.mkdir()
    for i, image in enumerate(solid_images(24, size=40, seed=7)):
        image.save(images / f"img{i:02d}.png")
    rows = [{"reference": f"img{i:02d}", "text": ["make it blue", "red circle", "and more"][i % 3],
             "target": f"img{(i + 5) % 24:02d}", "split": "train" if i < 16 else "val"} for i in range(24)]
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["reference", "text", "target", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return build_custom(images, tmp_path / "pairs.csv", tmp_path / "tiny_cir", all_images_in_corpus=True)


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A saved tiny CLIP4CIR with its processor (CLIP4Cir image processor + word-level tokenizer)."""
    from modeling_spn4cir import CLIP4CIRImageProcessor, CLIP4CIRProcessor

    model = tiny_model("vit", "sum")
    model.config.text_config.eos_token_id = 3  # the tiny tokenizer's <eot>
    model.text_model.eos_token_id = 3
    processor = CLIP4CIRProcessor(image_processor=CLIP4CIRImageProcessor(size=32),
                                  tokenizer=tiny_tokenizer(["make it blue", "red circle", "and more"]))
    out = tmp_path / "tiny_model"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture
def image_dir(tmp_path):
    """A folder of 12 small PNGs, every fourth one in `sub/` (a gallery to index)."""
    folder = tmp_path / "gallery"
    (folder / "sub").mkdir(parents=True)
    for i, image in enumerate(solid_images(12, size=40, seed=3)):
        image.save(folder / ("sub" if i % 4 == 0 else "") / f"im{i:02d}.png")
    return folder


@pytest.fixture
def saved_tiny_model(tiny_model_dir):
    """(directory, model in eval mode, processor) of the saved tiny CLIP4CIR of `tiny_model_dir`."""
    from modeling_spn4cir import CLIP4CIRModel, CLIP4CIRProcessor

    model = CLIP4CIRModel.from_pretrained(tiny_model_dir).eval()
    processor = CLIP4CIRProcessor.from_pretrained(tiny_model_dir)
    return tiny_model_dir, model, processor


def retrieval_pipeline(model, processor):
    """The "composed-image-retrieval" pipeline of `model` and `processor`, on the CPU."""
    from transformers import pipeline

    import modeling_spn4cir  # noqa: F401  (registers the task)

    return pipeline("composed-image-retrieval", model=model, processor=processor, device=-1)


@pytest.fixture
def tiny_clip_dir(tmp_path):
    """A tiny `transformers.CLIPModel` with a tokenizer, saved like a Hub checkpoint."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(["make it blue", "red circle", "and more"])
    text = dict(TINY_TEXT, vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=2, eos_token_id=3)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config={k: v for k, v in TINY_VIT.items() if k != "model_type"},
                                projection_dim=16))
    clip.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    return tmp_path / "clip"


# The parity fixtures of a test module that sets `PARITY` (a folder of tests/fixtures: inputs the original code was
# run on, and what it computed).
@pytest.fixture(scope="module")
def inputs(request):
    from safetensors.torch import load_file

    return load_file(request.module.PARITY / "inputs.safetensors")


@pytest.fixture(scope="module")
def expected(request):
    from safetensors.torch import load_file

    return load_file(request.module.PARITY / "expected.safetensors")
