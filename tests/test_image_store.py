"""ImageStore: an unknown image id is an error naming the id, the corpora searched and the fix."""

import datasets
import pytest
from conftest import solid_images

from modeling_spn4cir.image_store import ImageStore, UnknownImageError


def _corpus(ids):
    return datasets.Dataset.from_dict({"image_id": ids, "image": solid_images(len(ids))},
                                      features=datasets.Features({"image_id": datasets.Value("string"),
                                                                  "image": datasets.Image()}))


@pytest.mark.parametrize("call", ["raw", "raw_bytes", "digests", "stamps"])
def test_unknown_image_names_the_id_the_corpora_and_the_fix(call):
    store = ImageStore(_corpus(["a", "b"]), _corpus(["c"]))
    assert store.raw("c")[0] == store.raw_bytes("c")  # the second corpus is searched too
    argument = "zz" if call in ("raw", "raw_bytes") else ["a", "zz"]
    with pytest.raises(UnknownImageError) as error:
        getattr(store, call)(argument)
    message = str(error.value)
    assert isinstance(error.value, KeyError)  # callers that catch KeyError still do
    assert message.startswith("image 'zz' is not in the corpus (searched 2: 2 rows; 1 row)")
    assert "must list every image its triplets use" in message and "ImageStore(" in message


# ------------------------------------------------------------------------------------------- the image rule
def _exif_rotated_jpeg(path):
    """A 40x20 JPEG (left half red, right half blue) whose EXIF orientation 6 says "rotate 90 degrees clockwise"."""
    from PIL import Image

    image = Image.new("RGB", (40, 20), (220, 20, 20))
    image.paste((20, 20, 220), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif, quality=95)
    return path


def test_one_image_rule_encodes_what_it_draws_16_bit_exif_and_animated(saved_tiny_model, tmp_path):
    """16-bit grayscale is scaled (not white), the EXIF orientation is applied and an animated image gives its first
    frame — the same picture from `open_image`, the image store, the index (encoded and drawn) and the pipeline."""
    import numpy as np
    import torch
    from PIL import Image

    from modeling_spn4cir.image_files import open_image
    from modeling_spn4cir.retrieval import CIRIndex

    gallery = tmp_path / "gallery"
    gallery.mkdir()
    ramp = np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16)
    Image.fromarray(ramp).save(gallery / "depth.png")
    assert Image.open(gallery / "depth.png").mode == "I;16"
    _exif_rotated_jpeg(gallery / "phone.jpg")
    frames = [Image.new("RGB", (24, 24), colour) for colour in ((230, 10, 10), (10, 10, 230))]
    frames[0].save(gallery / "blink.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)

    depth = np.asarray(open_image(gallery / "depth.png"))
    assert depth.shape == (30, 40, 3) and np.abs(depth[..., 0].astype(int) - np.rint(ramp / 257)).max() <= 1
    assert depth.mean() == pytest.approx(127.5, abs=1)  # PIL's convert("RGB") gives 254+ (all white)
    phone = np.asarray(open_image(gallery / "phone.jpg")).astype(int)
    assert phone.shape == (40, 20, 3)  # upright: the stored 40x20 turned a quarter
    assert phone[:18, :, 0].mean() > 180 > phone[22:, :, 0].mean()  # its left (red) half is now on top
    assert np.asarray(open_image(gallery / "blink.gif"))[0, 0].tolist() == [230, 10, 10]

    _, model, processor = saved_tiny_model
    index = CIRIndex.build(model, processor.image_processor, gallery, show_progress_bar=False)
    assert index.image_ids == ["blink.gif", "depth.png", "phone.jpg"]
    for image_id in index.image_ids:
        picture = open_image(gallery / image_id)
        drawn = index.open_image(image_id)
        stored = ImageStore(datasets.Dataset.from_dict(
            {"image_id": [image_id], "image": [str(gallery / image_id)]},
            features=datasets.Features({"image_id": datasets.Value("string"), "image": datasets.Image()})))
        assert np.array_equal(np.asarray(drawn), np.asarray(picture))
        assert np.array_equal(np.asarray(stored.images([image_id])[0]), np.asarray(picture))
        with torch.no_grad():
            encoded = model.get_target_embeds(processor.image_processor([picture])["pixel_values"])
        torch.testing.assert_close(index.embeddings[index.image_ids.index(image_id)], encoded[0], atol=1e-6, rtol=0)
    from conftest import retrieval_pipeline

    pipe = retrieval_pipeline(model, processor)
    for reference in (str(gallery / "phone.jpg"), Image.open(gallery / "phone.jpg")):  # a path, an unrotated PIL image
        pixels = pipe.preprocess({"image": reference, "text": "make it blue"})["pixel_values"]
        assert torch.equal(pixels, processor.image_processor([open_image(gallery / "phone.jpg")])["pixel_values"])


def test_an_unusable_image_is_an_error_naming_the_file_and_the_fix(tmp_path, monkeypatch):
    import PIL.Image
    from conftest import solid_images

    from modeling_spn4cir.image_files import BadImageError, image_problem, open_image

    good = tmp_path / "good.png"
    solid_images(1)[0].save(good)
    solid_images(1)[0].save(tmp_path / "good.jpg", quality=90)
    cases = {"cut.png": good.read_bytes()[: len(good.read_bytes()) // 2],
             "cut.jpg": (tmp_path / "good.jpg").read_bytes()[:300], "empty.png": b"", "notes.png": b"just text"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "folder.png").mkdir()
    for name in [*cases, "folder.png"]:
        with pytest.raises(BadImageError, match=rf"image {tmp_path / name} .*--skip_bad_images") as error:
            open_image(tmp_path / name)
        assert image_problem(tmp_path / name).split(" (")[0] in str(error.value)  # the converters' check agrees
    store = ImageStore(datasets.Dataset.from_dict(
        {"image_id": ["ok", "cut"], "image": [str(good), str(tmp_path / "cut.png")]},
        features=datasets.Features({"image_id": datasets.Value("string"), "image": datasets.Image()})))
    assert store.images(["ok"])[0].size == (40, 40)
    with pytest.raises(BadImageError, match=rf"image 'cut' \({tmp_path / 'cut.png'}\) does not decode"):
        store.images(["ok", "cut"])
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 700)  # 40x40 = 1600 pixels: more than twice the limit
    with pytest.raises(BadImageError, match=r"good.png is larger than PIL's decompression-bomb limit .*raise "
                                            r"PIL.Image.MAX_IMAGE_PIXELS.*--skip_bad_images"):
        open_image(good)
    assert "decompression-bomb" in image_problem(good)
