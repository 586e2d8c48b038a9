"""Every reader sees 16-bit, palette, CMYK and alpha images as the 8-bit RGB a viewer shows, never clipped white."""

import base64
import io

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from bad_inputs import sixteen_bit_images
from diffusion_align.data.captions import _PairImages
from diffusion_align.data.pairs import PairTransform, decode_image
from diffusion_align.evaluation.review import _data_uri
from diffusion_align.evaluation.scoring import open_image
from diffusion_align.images import to_rgb
from diffusion_align.rewards.labeling import PairImages

GREY = 128  # 0x8000 in 8 bits


@pytest.fixture
def files(tmp_path):
    paths = {}
    for name, data in sixteen_bit_images().items():
        paths[name] = tmp_path / name
        paths[name].write_bytes(data)
    return paths


def test_to_rgb_scales_instead_of_clipping():
    grey16 = Image.fromarray(np.array([[0, 0x8000, 0xFFFF]], dtype=np.uint16))
    assert grey16.mode == "I;16"
    assert np.asarray(grey16.convert("RGB"))[0, 1, 0] == 255, "PIL alone clips: the defect this guards against"
    assert np.asarray(to_rgb(grey16))[0].tolist() == [[0] * 3, [GREY] * 3, [255] * 3]
    assert np.asarray(to_rgb(grey16.convert("I")))[0, 1].tolist() == [GREY] * 3
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(to_rgb(floats))[0, :, 0].tolist() == [0, GREY, 255]
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    assert np.asarray(to_rgb(palette)).tolist() == [[[10, 20, 30], [200, 100, 50]]]
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))
    assert np.asarray(to_rgb(cmyk)).tolist() == [[[255, 0, 0]]]
    assert to_rgb(Image.new("RGBA", (1, 1), (1, 2, 3, 0))).getpixel((0, 0)) == (1, 2, 3)


def test_to_rgb_keeps_the_exif_orientation_of_a_16_bit_image(tmp_path):
    """The grid shows an image upright by its EXIF: a 16-bit one, rebuilt from its pixels, had lost it."""
    from PIL import ImageOps
    stored = Image.fromarray((np.arange(800).reshape(20, 40) * 60).astype(np.uint16))
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(tmp_path / "turned.png", exif=exif)
    with Image.open(tmp_path / "turned.png") as image:
        assert image.mode == "I;16" and ImageOps.exif_transpose(to_rgb(image)).size == (20, 40)


@pytest.mark.parametrize("name", ["grey16.png", "rgb16.png", "grey16.tif"])
def test_every_reader_sees_mid_grey(files, name):
    path = files[name]
    assert np.asarray(open_image(path, None)).mean() == GREY  # score, grid and the review page's scores

    # review: formats browsers show (PNG) go as stored, others as an 8-bit PNG
    uri = _data_uri(path, path.read_bytes())
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as shown:
        assert np.asarray(to_rgb(shown)).mean() == GREY

    # training data: the pixels given to the VAE, in [-1, 1]
    image = decode_image(path.read_bytes(), "row 0, column jpg_0")
    pixels, _, _ = PairTransform(32, True, "no").apply(image, False, torch.Generator().manual_seed(0))
    assert pixels.mean().item() == pytest.approx(GREY / 127.5 - 1, abs=1e-6)

    # label (scorers' preprocessing) and caption (the captioner's images): decoded rows of a pairs table
    rows = datasets.Dataset.from_dict({"jpg_0": [path.read_bytes()], "jpg_1": [path.read_bytes()],
                                       "caption": ["grey"]})
    item = PairImages(rows, [0], lambda im: torch.from_numpy(np.asarray(im).copy()))[0]
    assert item["pixels"].float().mean().item() == GREY
    assert all(np.asarray(im).mean() == GREY for im in _PairImages(rows)[0]["images"])
