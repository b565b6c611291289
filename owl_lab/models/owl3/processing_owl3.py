"""Owl3 processor: chat template, chunk-wise tokenization around ``<|image|>``, images, media_offset.

Follows the official processor (data/reference/owl3/SPEC.md §3.1–3.5) and adds what it lacks: batches
(right padding + attention_mask), ``answers=`` → labels, and correct per-image cutting for several
images.

* Prompt: ``<|im_start|>system\\n<|im_end|>`` + ``\\n<|im_start|>user\\n{text}<|im_end|>`` +
  ``\\n<|im_start|>assistant\\n``; each piece between ``<|image|>`` placeholders is tokenized on its
  own (BPE never merges across a placeholder), and the first token of each placeholder is s_n.
* Images: bicubic resize to S×S (S = vision ``image_size``: 384, or 378 for 241101), [0, 1],
  normalised with mean = std = 0.5. Optional cutting (off by default): best ``grid_squ_6`` anchor,
  rows×cols tiles + a global view, each a separate ``<|image|>`` in the cut prompt (template "v2" for
  240728-style models, "v3" for 241101).
* media_offset: dense [B, L, 2] with batch-global bases (gated/static/sum) or a list of per-sample
  start tensors (fused), as the model expects.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, BatchFeature, ProcessorMixin

from owl_lab.models.loading import drop_hub_kwargs
from owl_lab.models.owl3.configuration_owl3 import load_config
from owl_lab.models.owl3.image_processing_owl3 import (  # noqa: F401  (GRID_SQU_6 / select_anchor re-exported)
    GRID_SQU_6,
    Owl3ImageProcessor,
    select_anchor,
)
from owl_lab.models.owl3.media_owl3 import NO_IMAGE_MARKER
from owl_lab.models.prompt_batch import check_turns
from owl_lab.models.remote_code import AutoMapProcessorMixin

IMAGE_TOKEN = "<|image|>"
SYSTEM = "<|im_start|>system\n<|im_end|>"
USER = "\n<|im_start|>user\n{}<|im_end|>"
ASSISTANT = "\n<|im_start|>assistant\n"
ANSWER_END = "<|im_end|>"
CONFIG_NAME = "processor_config.json"


def cut_prompt(rows: int, cols: int, template: str) -> str:
    """Text replacing one ``<|image|>`` of a cut image (rows*cols tiles + global view)."""
    lines = "\n".join(
        " ".join((f"subimg({i},{j})" if template == "v2" else "") + IMAGE_TOKEN for j in range(cols))
        for i in range(rows)
    )
    if template == "v2":
        return f"Cut to {rows} rows {cols} columns with a global view\n{lines}\nglobal_view{IMAGE_TOKEN}"
    return f"<|start_cut|>{rows}*{cols}\n{lines}\n{IMAGE_TOKEN}<|end_cut|>"


class Owl3Processor(AutoMapProcessorMixin, ProcessorMixin):
    """Turns chat text with ``<|image|>`` placeholders and PIL images into an Owl3 batch.

    A ``transformers.ProcessorMixin``: ``tokenizer`` + ``image_processor`` (:class:`Owl3ImageProcessor`,
    which owns ``image_size`` and ``cut_enable``). Build it as before, ``Owl3Processor(tokenizer,
    image_size=384, template="v2", media_offset_format="dense", cut_enable=False, padding_side="right")``,
    or pass ``image_processor=`` instead of ``image_size`` / ``cut_enable`` (giving both is an error).
    """

    def __init__(
        self,
        tokenizer=None,
        image_size: int | None = None,
        template: str = "v2",
        media_offset_format: str = "dense",
        cut_enable: bool | None = None,
        padding_side: str = "right",
        image_processor: Owl3ImageProcessor | None = None,
        **kwargs,
    ):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left'; got {padding_side!r}.")
        if template not in ("v2", "v3") or media_offset_format not in ("dense", "list"):
            raise ValueError(
                f"template must be v2/v3 and media_offset_format dense/list; got {template}, "
                f"{media_offset_format}."
            )
        if image_processor is None:
            image_processor = Owl3ImageProcessor.for_size(
                384 if image_size is None else image_size, bool(cut_enable)
            )
        elif image_size is not None or cut_enable is not None:
            raise ValueError("Give either image_processor or image_size / cut_enable, not both.")
        if tokenizer is None:
            raise ValueError("Owl3Processor needs a tokenizer.")
        self.template = template
        self.media_offset_format = media_offset_format
        self.padding_side = padding_side
        super().__init__(tokenizer=tokenizer, image_processor=image_processor, **kwargs)

    @property
    def image_size(self) -> int:
        return self.image_processor.image_size

    @property
    def cut_enable(self) -> bool:
        return bool(self.image_processor.cut_enable)

    @classmethod
    def from_config(cls, config, tokenizer, **kwargs) -> Owl3Processor:
        fused = config.hyper_attention == "fused"
        defaults = {
            "image_size": config.vision_config.image_size,
            "template": "v3" if fused else "v2",
            "media_offset_format": "list" if fused else "dense",
        }
        return cls(tokenizer, **{**defaults, **kwargs})

    # ---- images -----------------------------------------------------------------------------------
    def process_image(self, image, cut: bool) -> tuple[list[torch.Tensor], str]:
        """One image → its pixel tensors [3, S, S] and the prompt text standing for it."""
        out = self.image_processor(image, cut_enable=bool(cut))
        rows, cols = out["cut_shapes"][0].tolist()
        return list(out["pixel_values"]), (cut_prompt(rows, cols, self.template) if cut else IMAGE_TOKEN)

    # ---- text -------------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def tokenize(self, content: str, apply_template: bool) -> tuple[list[int], list[int]]:
        """Chunk-wise tokenization → (ids, placeholder start indices)."""
        chunks = [SYSTEM, USER.format(content), ASSISTANT] if apply_template else [content]
        ids, starts = [], []
        for chunk in chunks:
            for k, piece in enumerate(chunk.split(IMAGE_TOKEN)):
                if k > 0:
                    starts.append(len(ids))
                    ids += self._encode(IMAGE_TOKEN)
                ids += self._encode(piece)
        return ids, starts

    def _split_images(self, texts: list[str], images) -> list[list]:
        counts = [t.count(IMAGE_TOKEN) for t in texts]
        if images is None:
            images = []
        if isinstance(images, (Image.Image, np.ndarray)):
            images = [images]
        nested = len(images) > 0 and all(isinstance(x, (list, tuple)) for x in images)
        if nested:
            per = [list(x) for x in images]
            if len(per) != len(texts):
                raise ValueError(f"images has {len(per)} per-sample lists for {len(texts)} texts.")
        else:
            if sum(counts) != len(images):
                raise ValueError(
                    f"The text has {sum(counts)} {IMAGE_TOKEN} placeholders but {len(images)} images "
                    "were given."
                )
            per, i = [], 0
            for c in counts:
                per.append(list(images[i : i + c]))
                i += c
        for b, (c, imgs) in enumerate(zip(counts, per, strict=True)):
            if c != len(imgs):
                raise ValueError(f"Sample {b} has {c} {IMAGE_TOKEN} placeholders but {len(imgs)} images.")
        return per

    def __call__(
        self,
        text,
        images=None,
        answers=None,
        apply_template: bool = True,
        return_tensors="pt",
        cut_enable: bool | None = None,
        turns=None,
    ) -> BatchFeature:
        """See the module docstring; returns input_ids, attention_mask, pixel_values,
        media_offset(, labels). ``turns`` (training, with ``answers``): per sample, follow-up
        ``(user text, answer)`` chat turns after the first answer, every answer labelled, text only."""
        if return_tensors not in ("pt", None):
            raise ValueError(f"Only return_tensors='pt' is supported; got {return_tensors!r}.")
        texts = [text] if isinstance(text, str) else list(text)
        if answers is not None:
            answers = [answers] if isinstance(answers, str) else list(answers)
            if len(answers) != len(texts):
                raise ValueError(f"{len(answers)} answers for {len(texts)} texts.")
        turns = check_turns(turns, len(texts), answers is not None, apply_template, IMAGE_TOKEN)
        cut = self.cut_enable if cut_enable is None else cut_enable
        pixels, rows = [], []
        for b, (content, imgs) in enumerate(zip(texts, self._split_images(texts, images), strict=True)):
            parts = content.split(IMAGE_TOKEN)
            new_content = parts[0]
            for img, rest in zip(imgs, parts[1:], strict=True):
                tensors, prompt = self.process_image(img, cut)
                pixels += tensors
                new_content += prompt + rest
            ids, starts = self.tokenize(new_content, apply_template)
            labels = [-100] * len(ids)
            if answers is not None:
                answer_ids = self._encode(answers[b] + ANSWER_END)
                ids, labels = ids + answer_ids, labels + answer_ids
            for user, reply in turns[b]:  # the chat template's next user / assistant turn
                ask = self._encode(USER.format(user)) + self._encode(ASSISTANT)
                answer_ids = self._encode(reply + ANSWER_END)
                ids, labels = ids + ask + answer_ids, labels + [-100] * len(ask) + answer_ids
            rows.append((ids, starts, labels))
        return self._collate(rows, pixels, answers is not None)

    def _collate(self, rows, pixels, with_labels: bool) -> BatchFeature:
        length = max(len(ids) for ids, _, _ in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        batch = len(rows)
        input_ids = torch.full((batch, length), pad, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        labels = torch.full((batch, length), -100, dtype=torch.long)
        dense = torch.zeros((batch, length, 2), dtype=torch.long)
        starts_list, base = [], 0
        for b, (ids, starts, lab) in enumerate(rows):
            n = len(ids)
            o = length - n if self.padding_side == "left" else 0  # first real position
            input_ids[b, o : o + n] = torch.tensor(ids, dtype=torch.long)
            attention_mask[b, o : o + n] = 1
            labels[b, o : o + n] = torch.tensor(lab, dtype=torch.long)
            s = torch.tensor(starts, dtype=torch.long) + o
            starts_list.append(s)
            if len(starts):
                t = torch.arange(o, o + n)
                counts = (s[None, :] < t[:, None]).sum(1)  # c_t = #{n : s_n < t}
                dense[b, :, 0] = base
                dense[b, o : o + n, 1] = base + counts
                dense[b, o + n :] = dense[b, o + n - 1]  # right padding repeats the last row
                dense[b, :o, 1] = base  # left padding sees nothing
                base += len(starts)
            else:
                dense[b, :, 1] = NO_IMAGE_MARKER
        data = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "media_offset": dense if self.media_offset_format == "dense" else starts_list,
        }
        if pixels:
            data["pixel_values"] = torch.stack(pixels)
        if with_labels:
            data["labels"] = labels
        return BatchFeature(data=data)

    # ---- tokenizer passthrough + persistence -------------------------------------------------------
    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    @classmethod
    def from_pretrained(cls, directory, config=None, **kwargs) -> Owl3Processor:
        """Tokenizer files + ``processor_config.json`` (this format with the image processor nested, or the
        lab's earlier flat one), else settings derived from the model config.

        ``kwargs``: only the Hub options ``AutoProcessor.from_pretrained`` forwards (ignored: the directory is
        local); anything else is a TypeError.
        """
        unknown = sorted(drop_hub_kwargs(kwargs))
        if unknown:
            raise TypeError(f"Owl3Processor.from_pretrained got unexpected keyword arguments {unknown}.")
        directory = Path(directory)
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        saved = directory / CONFIG_NAME
        if saved.is_file():
            settings = json.loads(saved.read_text())
            for key in ("processor_class", "auto_map"):
                settings.pop(key, None)
            if isinstance(settings.get("image_processor"), dict):
                saved_image = {k: v for k, v in settings["image_processor"].items() if k != "auto_map"}
                settings["image_processor"] = Owl3ImageProcessor.from_dict(saved_image)
            return cls(tokenizer, **settings)
        if config is None:
            config = load_config(directory)
        return cls.from_config(config, tokenizer)
