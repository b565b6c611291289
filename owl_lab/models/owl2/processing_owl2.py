"""mPLUG-Owl2 processor: official inference preprocessing, prompt template and tokenization
(data/reference/owl2/SPEC.md §3.1, §6).

* Images: RGB → squash-resize to max_edge × max_edge (bicubic, as the README / evaluation scripts)
  → CLIP: shortest edge to ``image_size`` (bicubic) → center crop → ×1/255 → CLIP mean/std.
* Prompt: ``USER: {text} ASSISTANT:`` (no system prompt).
* Tokens: the prompt is split on ``<|image|>``; each chunk is tokenized *separately* with BOS; the
  first chunk keeps its BOS, later chunks drop theirs, and -200 goes between chunks. A prompt that
  starts with the image has an empty first chunk, which is skipped, so nothing is stripped:
  ``[-200, BOS, ...]`` (official HEAD behaviour).
* Batches are right-padded; with ``answers`` the answer tokens + eos are appended and ``labels``
  are -100 everywhere except on them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, BatchFeature

from owl_lab.models.loading import drop_hub_kwargs
from owl_lab.models.owl2.configuration_owl2 import (
    DEFAULT_IMAGE_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    load_config,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROMPT_TEMPLATE = "USER: {text} ASSISTANT:"
PROCESSOR_CONFIG = "processor_config.json"
IMAGE_PROCESSOR_CONFIG = "preprocessor_config.json"


def preprocess_image(
    image: Image.Image, image_size: int, mean=CLIP_MEAN, std=CLIP_STD, squash: bool = True
) -> torch.Tensor:
    """One PIL image → float32 [3, image_size, image_size]."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    image = image.convert("RGB")
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


class Owl2Processor:
    """Text + images → ``input_ids`` (with -200), ``attention_mask``, ``pixel_values``, ``labels``."""

    def __init__(
        self, tokenizer, image_size: int = 448, image_mean=CLIP_MEAN, image_std=CLIP_STD, squash: bool = True
    ):
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.squash = squash

    # ---- pieces -------------------------------------------------------------------------------
    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.unk_token_id):
            if candidate is not None:
                return candidate
        return 0

    def tokenize_prompt(self, prompt: str) -> list[int]:
        """Chunk-wise tokenization around ``<|image|>`` (see module doc). Returns ids with -200."""
        chunks = [self.tokenizer(c).input_ids if c else [] for c in prompt.split(DEFAULT_IMAGE_TOKEN)]
        bos = self.tokenizer.bos_token_id
        strip_bos = bool(chunks[0]) and chunks[0][0] == bos  # HEAD: empty first chunk → keep all BOS
        ids = list(chunks[0])
        for chunk in chunks[1:]:
            ids.append(IMAGE_TOKEN_INDEX)
            ids.extend(chunk[1:] if strip_bos and chunk and chunk[0] == bos else chunk)
        return ids

    def preprocess_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """list of PIL images → [N, 3, S, S]."""
        return torch.stack(
            [
                preprocess_image(im, self.image_size, self.image_mean, self.image_std, self.squash)
                for im in images
            ]
        )

    # ---- call ---------------------------------------------------------------------------------
    def __call__(
        self,
        text: str | list[str],
        images=None,
        answers=None,
        apply_template: bool = True,
        return_tensors: str | None = "pt",
    ) -> BatchFeature:
        """Batch of prompts → BatchFeature.

        Args:
            text: raw user message(s) with ``<|image|>`` placeholders.
            images: None, a flat list of PIL images (order of appearance over the batch), or one
                list per sample. Their count must equal the placeholder count.
            answers: None or one answer string per sample (appended + eos; labels only on them).

        Returns:
            input_ids [B, L] (-200 markers), attention_mask [B, L], pixel_values [N_img, 3, S, S]
            (when there are images), labels [B, L] (when answers are given). Right-padded.
        """
        texts = [text] if isinstance(text, str) else list(text)
        counts = [t.count(DEFAULT_IMAGE_TOKEN) for t in texts]
        flat = self._flatten_images(images, counts)
        if answers is not None:
            answers = [answers] if isinstance(answers, str) else list(answers)
            if len(answers) != len(texts):
                raise ValueError(f"Got {len(texts)} prompts but {len(answers)} answers.")

        rows, label_rows = [], []
        for i, t in enumerate(texts):
            prompt = PROMPT_TEMPLATE.format(text=t) if apply_template else t
            ids = self.tokenize_prompt(prompt)
            labels = [IGNORE_INDEX] * len(ids)
            if answers is not None:
                answer = self.tokenizer(answers[i], add_special_tokens=False).input_ids
                answer = answer + [self.tokenizer.eos_token_id]
                ids, labels = ids + answer, labels + answer
            rows.append(ids)
            label_rows.append(labels)

        L = max(len(r) for r in rows)
        data = {
            "input_ids": [r + [self.pad_token_id] * (L - len(r)) for r in rows],
            "attention_mask": [[1] * len(r) + [0] * (L - len(r)) for r in rows],
        }
        if answers is not None:
            data["labels"] = [r + [IGNORE_INDEX] * (L - len(r)) for r in label_rows]
        if flat:
            data["pixel_values"] = self.preprocess_images(flat)
        if return_tensors is None:
            return BatchFeature(data)
        if return_tensors != "pt":
            raise ValueError(f"Only return_tensors='pt' is supported, got {return_tensors!r}.")
        data = {
            k: (v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.long))
            for k, v in data.items()
        }
        return BatchFeature(data)

    @staticmethod
    def _flatten_images(images, counts: list[int]) -> list:
        if images is None:
            images = []
        if isinstance(images, Image.Image):
            images = [images]
        images = list(images)
        nested = len(images) > 0 and all(isinstance(x, (list, tuple)) for x in images)
        if nested:
            if len(images) != len(counts):
                raise ValueError(f"Got {len(counts)} prompts but {len(images)} per-sample image lists.")
            for i, (imgs, n) in enumerate(zip(images, counts, strict=True)):
                if len(imgs) != n:
                    raise ValueError(
                        f"Prompt {i} has {n} {DEFAULT_IMAGE_TOKEN} placeholder(s) "
                        f"but {len(imgs)} image(s) were given."
                    )
            return [im for imgs in images for im in imgs]
        if len(images) != sum(counts):
            raise ValueError(
                f"The prompts have {sum(counts)} {DEFAULT_IMAGE_TOKEN} placeholder(s) in total "
                f"({counts} per prompt) but {len(images)} image(s) were given."
            )
        return images

    # ---- decoding -----------------------------------------------------------------------------
    @staticmethod
    def _clean(ids):
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return [i for i in ids if i >= 0]  # drop -200 markers / -100 labels

    def decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(self._clean(ids), **kwargs)

    def batch_decode(self, sequences, **kwargs) -> list[str]:
        return [self.decode(s, **kwargs) for s in sequences]

    # ---- persistence --------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """Tokenizer files + CLIP-style ``preprocessor_config.json`` + our ``processor_config.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(directory))
        S = self.image_size
        (directory / IMAGE_PROCESSOR_CONFIG).write_text(
            json.dumps(
                {
                    "image_processor_type": "CLIPImageProcessor",
                    "do_resize": True,
                    "size": {"shortest_edge": S},
                    "resample": 3,
                    "do_center_crop": True,
                    "crop_size": {"height": S, "width": S},
                    "do_rescale": True,
                    "rescale_factor": 1 / 255,
                    "do_normalize": True,
                    "image_mean": list(self.image_mean),
                    "image_std": list(self.image_std),
                },
                indent=2,
            )
        )
        (directory / PROCESSOR_CONFIG).write_text(
            json.dumps({"processor_class": "Owl2Processor", "image_size": S, "squash": self.squash}, indent=2)
        )

    @classmethod
    def from_config(cls, config, tokenizer, **kwargs) -> Owl2Processor:
        """A processor for a fresh model: image size from ``config`` (an :class:`Owl2Config`)."""
        return cls(tokenizer, **{"image_size": config.image_size, **kwargs})

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs) -> Owl2Processor:
        """Tokenizer via AutoTokenizer; image settings from the processor configs, else config.json."""
        directory = Path(directory)
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        settings: dict = {}
        if (directory / IMAGE_PROCESSOR_CONFIG).is_file():
            pre = json.loads((directory / IMAGE_PROCESSOR_CONFIG).read_text())
            crop = pre.get("crop_size")
            settings["image_size"] = crop.get("height") if isinstance(crop, dict) else crop
            settings["image_mean"] = pre.get("image_mean", CLIP_MEAN)
            settings["image_std"] = pre.get("image_std", CLIP_STD)
        if (directory / PROCESSOR_CONFIG).is_file():
            own = json.loads((directory / PROCESSOR_CONFIG).read_text())
            settings.update({k: own[k] for k in ("image_size", "squash") if k in own})
        if settings.get("image_size") is None and (directory / "config.json").is_file():
            settings["image_size"] = load_config(directory).image_size
        settings = {k: v for k, v in settings.items() if v is not None}
        settings.update(drop_hub_kwargs(kwargs))
        return cls(tokenizer, **settings)
