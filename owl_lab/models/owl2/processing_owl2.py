"""mPLUG-Owl2 processor: official inference preprocessing, prompt template and tokenization
(data/reference/owl2/SPEC.md §3.1, §6).

* Images (:class:`~owl_lab.models.owl2.image_processing_owl2.Owl2ImageProcessor`, transformers' CLIP
  image processor on the PIL backend): RGB → squash-resize to max_edge × max_edge (bicubic, as the
  README / evaluation scripts) → CLIP: shortest edge to ``image_size`` (bicubic) → center crop →
  ×1/255 → CLIP mean/std.
* Prompt: ``USER: {text} ASSISTANT:`` (no system prompt).
* Tokens: the prompt is split on ``<|image|>``; each chunk is tokenized *separately* with BOS; the
  first chunk keeps its BOS, later chunks drop theirs, and -200 goes between chunks. A prompt that
  starts with the image has an empty first chunk, which is skipped, so nothing is stripped:
  ``[-200, BOS, ...]`` (official HEAD behaviour).
* Batches are right-padded; with ``answers`` the answer tokens + eos are appended and ``labels``
  are -100 everywhere except on them.
* Persistence: a ``transformers.ProcessorMixin`` (tokenizer + image processor). ``save_pretrained`` writes
  the tokenizer, ``processor_config.json`` (the image processor nested, as transformers 5 does), a CLIP-style
  ``preprocessor_config.json`` for older readers, and ``auto_map`` entries for ``trust_remote_code``
  (:mod:`owl_lab.models.remote_code`). ``from_pretrained`` also reads the lab's earlier format
  (``processor_config.json`` = ``{image_size, squash}``, as in the shipped checkpoints) and official
  releases (CLIP ``preprocessor_config.json`` only).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoTokenizer, BatchFeature, ProcessorMixin

from owl_lab.models.loading import drop_hub_kwargs
from owl_lab.models.owl2.configuration_owl2 import (
    DEFAULT_IMAGE_TOKEN,
    IMAGE_TOKEN_INDEX,
    load_config,
)
from owl_lab.models.owl2.image_processing_owl2 import (  # noqa: F401  (preprocess_image re-exported)
    CLIP_MEAN,
    CLIP_STD,
    Owl2ImageProcessor,
    preprocess_image,
)
from owl_lab.models.prompt_batch import batch_feature, encode_prompts, flatten_images
from owl_lab.models.remote_code import AutoMapProcessorMixin

PROCESSOR_CONFIG = "processor_config.json"
IMAGE_PROCESSOR_CONFIG = "preprocessor_config.json"


class Owl2Processor(AutoMapProcessorMixin, ProcessorMixin):
    """Text + images → ``input_ids`` (with -200), ``attention_mask``, ``pixel_values``, ``labels``.

    Build it as before, ``Owl2Processor(tokenizer, image_size=448, image_mean=..., image_std=...,
    squash=True)``, or from parts, ``Owl2Processor(tokenizer, image_processor=Owl2ImageProcessor(...))``
    (then the image settings come from the image processor; giving both is an error).
    """

    def __init__(
        self,
        tokenizer=None,
        image_size: int | None = None,
        image_mean=None,
        image_std=None,
        squash: bool | None = None,
        image_processor: Owl2ImageProcessor | None = None,
        **kwargs,
    ):
        settings = {
            "image_size": image_size,
            "image_mean": image_mean,
            "image_std": image_std,
            "squash": squash,
        }
        given = sorted(k for k, v in settings.items() if v is not None)
        if image_processor is None:
            image_processor = Owl2ImageProcessor.for_size(
                448 if image_size is None else image_size,
                CLIP_MEAN if image_mean is None else image_mean,
                CLIP_STD if image_std is None else image_std,
                True if squash is None else squash,
            )
        elif given:
            raise ValueError(f"Give either image_processor or the image settings {given}, not both.")
        if tokenizer is None:
            raise ValueError("Owl2Processor needs a tokenizer.")
        super().__init__(tokenizer=tokenizer, image_processor=image_processor, **kwargs)

    # ---- image settings (read from the image processor) -------------------------------------------
    @property
    def image_size(self) -> int:
        return self.image_processor.image_size

    @property
    def image_mean(self) -> tuple[float, ...]:
        return tuple(self.image_processor.image_mean)

    @property
    def image_std(self) -> tuple[float, ...]:
        return tuple(self.image_processor.image_std)

    @property
    def squash(self) -> bool:
        return bool(self.image_processor.do_squash)

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
        """list of PIL images → [N, 3, S, S] float32 (bit-equal to ``preprocess_image``)."""
        return self.image_processor(list(images), return_tensors="pt")["pixel_values"]

    # ---- call ---------------------------------------------------------------------------------
    def __call__(
        self,
        text: str | list[str],
        images=None,
        answers=None,
        apply_template: bool = True,
        return_tensors: str | None = "pt",
        turns=None,
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
        flat = flatten_images(images, [t.count(DEFAULT_IMAGE_TOKEN) for t in texts], DEFAULT_IMAGE_TOKEN)
        data = encode_prompts(
            texts, answers, self.tokenize_prompt, self.tokenizer, self.pad_token_id, apply_template, turns
        )
        if flat:
            data["pixel_values"] = self.preprocess_images(flat)
        return batch_feature(data, return_tensors)

    # ---- decoding -----------------------------------------------------------------------------
    @staticmethod
    def _clean(ids):
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return [i for i in ids if i >= 0]  # drop -200 markers / -100 labels

    def decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(self._clean(ids), **kwargs)

    def batch_decode(self, sequences, **kwargs) -> list[str]:
        return [self.decode(s, **kwargs) for s in sequences]

    # ---- persistence (save_pretrained: AutoMapProcessorMixin) ---------------------------------
    @classmethod
    def from_config(cls, config, tokenizer, **kwargs) -> Owl2Processor:
        """A processor for a fresh model: image size from ``config`` (an :class:`Owl2Config`)."""
        return cls(tokenizer, **{"image_size": config.image_size, **kwargs})

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs) -> Owl2Processor:
        """Tokenizer via AutoTokenizer; the image processor from (first found) ``processor_config.json``'s
        nested ``image_processor``, ``preprocessor_config.json`` (official CLIP file), the lab's earlier
        ``processor_config.json`` keys ``image_size`` / ``squash``, else ``config.json``'s image size.

        ``kwargs``: image settings (``image_size``, ``image_mean``, ``image_std``, ``squash``) override the
        saved ones; the Hub options ``AutoProcessor`` forwards are ignored (the directory is local).
        """
        directory = Path(directory)
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        own = (
            json.loads((directory / PROCESSOR_CONFIG).read_text())
            if (directory / PROCESSOR_CONFIG).is_file()
            else {}
        )
        if isinstance(own.get("image_processor"), dict):
            image_dict = own["image_processor"]
        elif (directory / IMAGE_PROCESSOR_CONFIG).is_file():
            image_dict = json.loads((directory / IMAGE_PROCESSOR_CONFIG).read_text())
        else:
            image_dict = None
        image_processor, settings = None, {}
        if image_dict is not None:
            image_processor = Owl2ImageProcessor.from_dict(
                {k: v for k, v in image_dict.items() if k != "auto_map"}
            )
            settings = {
                "image_size": image_processor.image_size,
                "image_mean": image_processor.image_mean,
                "image_std": image_processor.image_std,
                "squash": image_processor.do_squash,
            }
        overrides = {k: own[k] for k in ("image_size", "squash") if k in own}  # the lab's earlier format
        overrides.update(drop_hub_kwargs(kwargs))
        if image_processor is not None and not overrides:
            return cls(tokenizer, image_processor=image_processor)
        settings.update(overrides)
        if settings.get("image_size") is None and (directory / "config.json").is_file():
            settings["image_size"] = load_config(directory).image_size
        return cls(tokenizer, **settings)
