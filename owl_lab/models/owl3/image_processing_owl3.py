"""mPLUG-Owl3 image preprocessing (data/reference/owl3/SPEC.md §3.2–3.3) as a transformers image processor.

* Each image: RGB → bicubic resize to S×S (S = the vision tower's ``image_size``: 384, or 378 for
  241101) → [0, 1] → normalised with mean = std = 0.5 (ToTensor then Normalize(0.5, 0.5)).
* Optional cutting (``cut_enable``, off by default): the best ``grid_squ_6`` anchor (rows, cols), the
  image resized to rows·S × cols·S and split row-major into rows·cols tiles, then the S×S global view.

:class:`Owl3ImageProcessor` returns ``pixel_values`` [N_tensors, 3, S, S] (every image's tiles then its
global view, images in order) and ``cut_shapes`` [N_images, 2] long = (rows, cols), (0, 0) for an image
that was not cut; the processor turns ``cut_shapes`` into the cut prompt text. The arithmetic is the
lab's original (PIL resize, torch float32 ÷255, −mean ÷std), so the numbers are unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import PILImageResampling
from transformers.processing_utils import ImagesKwargs

from owl_lab.models.remote_code import remote

GRID_SQU_6 = ((2, 2), (1, 3), (1, 4), (3, 1), (4, 1), (2, 3), (3, 2))  # (rows, cols); no (1, 1)
NOT_CUT = (0, 0)


def select_anchor(width: int, height: int, size: int, anchors=GRID_SQU_6) -> tuple[int, int]:
    """'docowl' anchor choice: argmax of 100·IoU(anchor, aspect-matched box) + IoU(anchor, image)."""
    boxes = torch.tensor([[0, 0, c * size, r * size] for r, c in anchors])  # x1 y1 x2 y2, int64
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])

    def iou(other: torch.Tensor) -> torch.Tensor:
        wh = (torch.minimum(boxes[:, 2:], other[:, 2:]) - torch.maximum(boxes[:, :2], other[:, :2])).clamp(
            min=0
        )
        inter = wh[:, 0] * wh[:, 1]
        other_area = (other[:, 2] - other[:, 0]) * (other[:, 3] - other[:, 1])
        return inter / (area + other_area - inter + 1e-5)

    image_box = torch.tensor([[0, 0, width, height]]).expand_as(boxes)
    shaped = boxes.clone()
    shaped[:, 3] = (height / width * boxes[:, 2].double()).long()  # aspect-matched height (int, truncated)
    return anchors[int(torch.argmax(iou(shaped) * 100 + iou(image_box)))]


def as_rgb_image(image) -> Image.Image:
    """PIL image or H×W×3 uint8 array → RGB PIL image; anything else is a ValueError."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"images must be PIL images (or HxWx3 uint8 arrays); got {type(image).__name__}.")
    return image.convert("RGB")


class Owl3ImageProcessorKwargs(ImagesKwargs, total=False):
    """``ImagesKwargs`` plus ``cut_enable``: cut each image into anchor tiles + a global view."""

    cut_enable: bool


class Owl3ImageProcessor(PilBackend):
    """Images → ``pixel_values`` [N_tensors, 3, S, S] and ``cut_shapes`` [N_images, 2] (see module doc)."""

    valid_kwargs = Owl3ImageProcessorKwargs
    model_input_names = ["pixel_values"]
    size = {"height": 384, "width": 384}
    resample = PILImageResampling.BICUBIC
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.5, 0.5, 0.5)
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    cut_enable = False

    @classmethod
    def for_size(cls, image_size: int, cut_enable: bool = False) -> Owl3ImageProcessor:
        """The processor for the vision tower's ``image_size`` (square tiles)."""
        if int(image_size) <= 0:
            raise ValueError(f"image_size must be a positive int; got {image_size!r}.")
        s = int(image_size)
        return cls(size={"height": s, "width": s}, cut_enable=bool(cut_enable))

    @property
    def image_size(self) -> int:
        return int(self.size["height"])

    def to_dict(self) -> dict:
        """Settings + ``auto_map`` (so ``AutoImageProcessor`` finds the class with ``trust_remote_code``)."""
        return {**super().to_dict(), "auto_map": {"AutoImageProcessor": remote(type(self).__name__)}}

    def _to_tensor(self, image: Image.Image, width: int, height: int, mean, std, scale) -> torch.Tensor:
        """Bicubic resize → [3, height, width] float32: ÷(1/scale) (÷255), then (x − mean) / std."""
        array = np.asarray(image.resize((width, height), Image.BICUBIC), dtype=np.uint8)
        x = (
            torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(1 / scale)
        )  # 1 / (1/255) == 255.0 exactly
        mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(std, dtype=torch.float32)[:, None, None]
        return (x - mean) / std

    def cut_image(
        self, image, cut: bool, size: int, mean, std, scale
    ) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """One image → its tensors [3, S, S] (tiles row-major, then the global view) and (rows, cols)."""
        image = as_rgb_image(image)
        if not cut:
            return [self._to_tensor(image, size, size, mean, std, scale)], NOT_CUT
        rows, cols = select_anchor(image.width, image.height, size)
        big = self._to_tensor(image, cols * size, rows * size, mean, std, scale)  # [3, rows*S, cols*S]
        tiles = big.view(3, rows, size, cols, size).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, size, size)
        return [*tiles, self._to_tensor(image, size, size, mean, std, scale)], (rows, cols)

    def _preprocess_image_like_inputs(self, images, *args, **kwargs) -> BatchFeature:
        """The lab's own pipeline on the raw images (a single image or a flat list)."""
        if not (kwargs["do_resize"] and kwargs["do_rescale"] and kwargs["do_normalize"]):
            raise ValueError(
                "Owl3ImageProcessor always resizes, rescales and normalises (the model expects it)."
            )
        if kwargs["size"].height != kwargs["size"].width:
            raise ValueError(f"Owl3 tiles are square; got size {dict(kwargs['size'])}.")
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        pixels, shapes = [], []
        for image in images:
            tensors, shape = self.cut_image(
                image,
                bool(kwargs.get("cut_enable")),
                kwargs["size"].height,
                kwargs["image_mean"],
                kwargs["image_std"],
                kwargs["rescale_factor"],
            )
            pixels += tensors
            shapes.append(shape)
        pixel_values = torch.stack(pixels) if pixels else torch.zeros(0, 3, self.image_size, self.image_size)
        cut_shapes = torch.tensor(shapes, dtype=torch.long).reshape(-1, 2)
        return BatchFeature(data={"pixel_values": pixel_values, "cut_shapes": cut_shapes})
