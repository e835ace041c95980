"""Shared helpers: tiny CLIP4CIR configs built in the test, nothing downloaded."""

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
    on PYTHONPATH so the children import this checkout whatever is installed, and `tests/` so that they import its
    helpers (`conftest`, `test_losses`) as the tests do; fail with their output.

    The rendezvous is static on 127.0.0.1 and gloo uses the loopback interface: `--standalone` resolves the
    host's name (`getfqdn`), and one CI run hung there for 300 s with no output from the children. A hang (the
    children's watchdog fired, or the launcher's timeout) is retried once with a warning that carries the
    children's stacks; a wrong result or a crash fails at once, never retried."""
    script = Path(__file__).parent / "scripts" / script_name
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tests.parent), str(tests),
                                                                     os.environ.get("PYTHONPATH")])),
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
