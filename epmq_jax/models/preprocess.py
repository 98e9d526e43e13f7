"""CLIP image preprocessing, matching transformers' ``CLIPImageProcessor`` (PIL backend), NHWC out.

Steps, as the processor does them: convert to RGB; resize so the shortest side is ``size``
(PIL bicubic; the long side becomes ``int(size * long / short)``); center-crop ``crop_size``;
scale to [0, 1]; normalise with OpenAI CLIP's mean and std.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image

#: OpenAI CLIP's per-channel normalisation (RGB).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def _to_pil_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 3))):
        raise ValueError(f"image array has shape {arr.shape} and dtype {arr.dtype}; expected "
                         "uint8 (H, W), (H, W, 1) or (H, W, 3)")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(arr).convert("RGB")


def preprocess_image(image: Image.Image | np.ndarray, size: int = 224,
                     crop_size: int = 224) -> np.ndarray:
    """One image -> CLIP input.

    Args:
        image: a PIL image, or a uint8 array ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)``
            (grey images are replicated to RGB).
        size: target length of the shortest side.
        crop_size: side of the square center crop.

    Returns:
        float32 ``(crop_size, crop_size, 3)``, normalised with :data:`CLIP_MEAN`, :data:`CLIP_STD`.
    """
    img = _to_pil_rgb(image)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    arr = np.asarray(img.resize((new_w, new_h), resample=Image.BICUBIC))
    top, left = (new_h - crop_size) // 2, (new_w - crop_size) // 2
    if top < 0 or left < 0:
        raise ValueError(f"crop_size={crop_size} is larger than the resized image "
                         f"({new_h}, {new_w}); expected crop_size <= size={size}")
    arr = arr[top:top + crop_size, left:left + crop_size]
    x = (arr.astype(np.float64) / 255.0).astype(np.float32)
    return (x - CLIP_MEAN) / CLIP_STD


def preprocess_images(images: Iterable[Image.Image | np.ndarray], size: int = 224,
                      crop_size: int = 224) -> np.ndarray:
    """A batch of images (any sizes) -> NHWC float32 ``(n, crop_size, crop_size, 3)``."""
    return np.stack([preprocess_image(im, size, crop_size) for im in images])
