"""The lab's prompts and images → inputs of a stock ``transformers.LlavaForConditionalGeneration``.

* Tokens: the lab's word tokenizer for family ``llava`` (LLaMA-like specials: ``<s>`` = 1,
  ``</s>`` = 2, pad 0 — the decoder is a Llama). The prompt template is LLaVA-1.5's
  ``USER: {text} ASSISTANT:``; each ``<|image|>`` (one vocabulary token) is repeated
  ``image_seq_length`` times — one position per visual token, which LLaVA fills with the projected
  patch features (``config.image_token_id`` is that token's id).
* Images: the same CLIP preprocessing as the Owl2 processor (squash, bicubic, CLIP mean/std).
* Batches are right-padded; with ``answers`` the answer tokens + eos are appended and ``labels``
  are -100 everywhere except on them (the sequence the logits live on is ``input_ids`` itself).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer, BatchFeature

from owl_lab.models.owl2.configuration_owl2 import DEFAULT_IMAGE_TOKEN as IMAGE_PLACEHOLDER
from owl_lab.models.owl2.processing_owl2 import CLIP_MEAN, CLIP_STD, preprocess_image
from owl_lab.models.prompt_batch import batch_feature, encode_prompts, flatten_images

PROCESSOR_CONFIG = "processor_config.json"


class LlavaProcessor:
    """Text + images → ``input_ids`` (image token repeated per visual token), ``attention_mask``,
    ``pixel_values`` [N_img, 3, S, S] and ``labels``."""

    def __init__(
        self, tokenizer, image_size: int, image_seq_length: int, image_mean=CLIP_MEAN, image_std=CLIP_STD
    ):
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.image_seq_length = int(image_seq_length)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {IMAGE_PLACEHOLDER} token")

    @classmethod
    def from_config(cls, config, tokenizer) -> LlavaProcessor:
        """Processor matching a ``LlavaConfig`` (image size, visual tokens per image)."""
        out = cls(tokenizer, config.vision_config.image_size, config.image_seq_length)
        if out.image_token_id != config.image_token_id:
            raise ValueError(
                f"tokenizer's {IMAGE_PLACEHOLDER} id {out.image_token_id} != config.image_token_id "
                f"{config.image_token_id}"
            )
        return out

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def tokenize_prompt(self, prompt: str) -> list[int]:
        """BOS + prompt ids with each ``<|image|>`` repeated ``image_seq_length`` times."""
        ids = []
        for i in self.tokenizer(prompt).input_ids:
            ids.extend([i] * self.image_seq_length if i == self.image_token_id else [i])
        return ids

    def preprocess_images(self, images) -> torch.Tensor:
        """list of PIL images → [N, 3, S, S]."""
        return torch.stack(
            [preprocess_image(im, self.image_size, self.image_mean, self.image_std) for im in images]
        )

    def __call__(
        self,
        text: str | list[str],
        images=None,
        answers=None,
        apply_template: bool = True,
        return_tensors: str | None = "pt",
        turns=None,
    ) -> BatchFeature:
        """Batch of prompts → BatchFeature (see module doc). Image-count errors as in the Owl2 processor."""
        texts = [text] if isinstance(text, str) else list(text)
        flat = flatten_images(images, [t.count(IMAGE_PLACEHOLDER) for t in texts], IMAGE_PLACEHOLDER)
        data = encode_prompts(
            texts, answers, self.tokenize_prompt, self.tokenizer, self.pad_token_id, apply_template, turns
        )
        if flat:
            data["pixel_values"] = self.preprocess_images(flat)
        return batch_feature(data, return_tensors)

    def decode(self, ids, **kwargs) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.tokenizer.decode([i for i in ids if i >= 0 and i != self.image_token_id], **kwargs)

    def batch_decode(self, sequences, **kwargs) -> list[str]:
        return [self.decode(s, **kwargs) for s in sequences]

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(directory))
        (directory / PROCESSOR_CONFIG).write_text(
            json.dumps(
                {
                    "processor_class": "LlavaProcessor",
                    "image_size": self.image_size,
                    "image_seq_length": self.image_seq_length,
                    "image_mean": list(self.image_mean),
                    "image_std": list(self.image_std),
                },
                indent=2,
            )
            + "\n"
        )

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> LlavaProcessor:
        directory = Path(directory)
        own = json.loads((directory / PROCESSOR_CONFIG).read_text())
        return cls(
            AutoTokenizer.from_pretrained(str(directory)),
            own["image_size"],
            own["image_seq_length"],
            own.get("image_mean", CLIP_MEAN),
            own.get("image_std", CLIP_STD),
        )
