"""CLIP preprocessing vs transformers' CLIPImageProcessor (PIL backend) on random images."""

import numpy as np
import pytest
from PIL import Image

from epmq_jax.models.preprocess import preprocess_image, preprocess_images

transformers = pytest.importorskip("transformers")

# landscape, portrait, tiny (upsampling, like MNIST/SVHN), odd crop offsets, already 224
SHAPES = [(240, 320, 3), (301, 257, 3), (28, 28, 3), (225, 500, 3), (224, 224, 3)]


def _image(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_matches_clip_image_processor():
    proc = transformers.CLIPImageProcessorPil()
    images = [Image.fromarray(_image(s, i)) for i, s in enumerate(SHAPES)]
    want = np.stack([proc(images=im, return_tensors="np")["pixel_values"][0] for im in images])
    got = preprocess_images(images)
    assert got.shape == (len(SHAPES), 224, 224, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1), atol=1e-5, rtol=0)


def test_grey_and_array_inputs():
    proc = transformers.CLIPImageProcessorPil()
    grey = _image((28, 28), 7)
    want = proc(images=Image.fromarray(grey), return_tensors="np")["pixel_values"][0]
    for x in (grey, grey[..., None], Image.fromarray(grey)):
        np.testing.assert_allclose(preprocess_image(x), want.transpose(1, 2, 0), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_image(np.zeros((8, 8, 3), np.float32))
