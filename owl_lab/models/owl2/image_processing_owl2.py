"""mPLUG-Owl2 image preprocessing (data/reference/owl2/SPEC.md §3.1): the official squash, then CLIP.

Two implementations of the same steps live here:

* :func:`preprocess_image` — the lab's reference, written out step by step with PIL and NumPy;
* :class:`Owl2ImageProcessor` — a ``transformers`` image processor: transformers' own
  ``CLIPImageProcessorPil`` (shortest edge → bicubic resize → center crop → ×1/255 → CLIP mean/std)
  preceded by the squash (``do_squash``). It is what :class:`~owl_lab.models.owl2.Owl2Processor`
  uses, what ``AutoImageProcessor`` returns for an Owl2 checkpoint after ``import owl_lab``, and it
  is bit-equal to :func:`preprocess_image`
  (test: ``tests/owl_lab/models/owl2/test_image_processing_owl2.py``).

The PIL backend is chosen on purpose: transformers' torchvision backend resizes with a different
bicubic kernel and would change the pixel values (hence every number downstream).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil
from transformers.image_utils import PILImageResampling
from transformers.processing_utils import ImagesKwargs

from owl_lab.models.remote_code import remote

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _as_rgb_pil(image) -> Image.Image:
    """PIL image or H×W(×C) uint8 array → RGB PIL image (PIL's own conversion, alpha dropped)."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    return image.convert("RGB")


def squash(image) -> Image.Image:
    """The official inference step before CLIP: bicubic resize to max_edge × max_edge (aspect not kept)."""
    image = _as_rgb_pil(image)
    edge = max(image.size)
    return image.resize((edge, edge), Image.BICUBIC)


def preprocess_image(
    image: Image.Image, image_size: int, mean=CLIP_MEAN, std=CLIP_STD, squash: bool = True
) -> torch.Tensor:
    """One PIL image → float32 [3, image_size, image_size] (the lab's step-by-step reference)."""
    image = _as_rgb_pil(image)
    if squash:  # official inference path: make it square first (aspect ratio not kept)
        edge = max(image.size)
        image = image.resize((edge, edge), Image.BICUBIC)
    w, h = image.size  # CLIP: shortest edge → image_size, then center crop
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(image_size * long / short)
    new_size = (image_size, new_long) if w <= h else (new_long, image_size)
    if new_size != image.size:
        image = image.resize(new_size, Image.BICUBIC)
    w, h = image.size
    left, top = (w - image_size) // 2, (h - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
    arr = (np.asarray(image, dtype=np.float64) * (1 / 255)).astype(np.float32)  # [S, S, 3]
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())  # [3, S, S]


class Owl2ImageProcessorKwargs(ImagesKwargs, total=False):
    """``ImagesKwargs`` plus ``do_squash``: resize to max_edge × max_edge before CLIP (official inference)."""

    do_squash: bool


class Owl2ImageProcessor(CLIPImageProcessorPil):
    """CLIP preprocessing (PIL backend) after the official squash: images → ``pixel_values`` [N, 3, S, S].

    Saved as a stock CLIP ``preprocessor_config.json`` plus ``do_squash``; an official release's CLIP
    config loads into it unchanged (``do_squash`` then defaults to True, as the official inference).
    """

    valid_kwargs = Owl2ImageProcessorKwargs
    do_squash = True
    resample = PILImageResampling.BICUBIC
    image_mean = CLIP_MEAN
    image_std = CLIP_STD
    size = {"shortest_edge": 448}
    crop_size = {"height": 448, "width": 448}

    @classmethod
    def for_size(
        cls, image_size: int, image_mean=CLIP_MEAN, image_std=CLIP_STD, squash: bool = True
    ) -> Owl2ImageProcessor:
        """The processor for square inputs of side ``image_size`` (the vision tower's size)."""
        if int(image_size) <= 0:
            raise ValueError(f"image_size must be a positive int; got {image_size!r}.")
        s = int(image_size)
        return cls(
            size={"shortest_edge": s},
            crop_size={"height": s, "width": s},
            image_mean=list(image_mean),
            image_std=list(image_std),
            do_squash=bool(squash),
        )

    @property
    def image_size(self) -> int:
        """Side of the square output (the crop height)."""
        return int(self.crop_size["height"])

    def process_image(self, image, do_squash: bool | None = None, **kwargs) -> np.ndarray:
        """One raw image → channels-first uint8 array, squashed first when ``do_squash``."""
        if do_squash or (do_squash is None and self.do_squash):
            image = squash(image)
        elif not isinstance(image, torch.Tensor):
            image = _as_rgb_pil(image)  # same RGB conversion as the reference (PIL's, alpha dropped)
        return super().process_image(image, **kwargs)

    def to_dict(self) -> dict:
        """Settings + ``auto_map`` (so ``AutoImageProcessor`` finds the class with ``trust_remote_code``)."""
        return {**super().to_dict(), "auto_map": {"AutoImageProcessor": remote(type(self).__name__)}}
