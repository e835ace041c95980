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
