"""Prompts (+ answers) → one right-padded batch: what the Owl2 and LLaVA processors share.

Both families template a user message as ``USER: {text} ASSISTANT:``, tokenize it with their own rule
(``tokenize_prompt``: Owl2 puts one -200 marker per image, LLaVA repeats its image token once per
visual token), append ``answer + eos`` when training, and put labels (-100 = ignored by the loss) on
the answer tokens only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from transformers import BatchFeature

IGNORE_INDEX = -100  # label value ignored by the loss
PROMPT_TEMPLATE = "USER: {text} ASSISTANT:"


def flatten_images(images, counts: Sequence[int], placeholder: str) -> list:
    """The images of a batch in order of appearance, checked against the prompts' placeholders.

    Args:
        images: None, one PIL image, a flat list (order of appearance over the batch), or one list per
            prompt.
        counts: placeholders per prompt.
        placeholder: the placeholder's text, for messages.

    Raises:
        ValueError: naming the prompt and the counts when they disagree.
    """
    if images is None:
        images = []
    if isinstance(images, Image.Image):
        images = [images]
    images = list(images)
    if images and all(isinstance(x, (list, tuple)) for x in images):  # one list per prompt
        if len(images) != len(counts):
            raise ValueError(f"Got {len(counts)} prompts but {len(images)} per-sample image lists.")
        for i, (imgs, n) in enumerate(zip(images, counts, strict=True)):
            if len(imgs) != n:
                raise ValueError(
                    f"Prompt {i} has {n} {placeholder} placeholder(s) but {len(imgs)} image(s) were given."
                )
        return [im for imgs in images for im in imgs]
    if len(images) != sum(counts):
        raise ValueError(
            f"The prompts have {sum(counts)} {placeholder} placeholder(s) in total "
            f"({list(counts)} per prompt) but {len(images)} image(s) were given."
        )
    return images


def encode_prompts(
    texts: Sequence[str],
    answers: str | Sequence[str] | None,
    tokenize_prompt: Callable[[str], list[int]],
    tokenizer,
    pad_token_id: int,
    apply_template: bool = True,
    turns: Sequence[Sequence[tuple[str, str]]] | None = None,
) -> dict[str, list[list[int]]]:
    """Token rows of a batch, right-padded to the longest: ``input_ids`` and ``attention_mask`` [B][L],
    plus ``labels`` [B][L] when ``answers`` (one per prompt) are given.

    ``tokenize_prompt(prompt) -> ids`` is the family's rule (BOS and image markers included); answers
    are tokenized without specials and end with ``tokenizer.eos_token_id``. ``turns`` (training, with
    answers): per prompt, follow-up ``(user text, answer)`` turns appended as ``USER: … ASSISTANT: answer``
    + eos (Vicuna's multi-turn form), every answer labelled; text only (see :func:`check_turns`).
    """
    if answers is not None:
        answers = [answers] if isinstance(answers, str) else list(answers)
        if len(answers) != len(texts):
            raise ValueError(f"Got {len(texts)} prompts but {len(answers)} answers.")
    turns = check_turns(turns, len(texts), answers is not None, apply_template)
    rows, label_rows = [], []
    for i, text in enumerate(texts):
        ids = tokenize_prompt(PROMPT_TEMPLATE.format(text=text) if apply_template else text)
        labels = [IGNORE_INDEX] * len(ids)
        if answers is not None:
            answer = tokenizer(answers[i], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            ids, labels = ids + answer, labels + answer
        for user, reply in turns[i]:
            ask = tokenizer(PROMPT_TEMPLATE.format(text=user), add_special_tokens=False).input_ids
            answer = tokenizer(reply, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            ids, labels = ids + ask + answer, labels + [IGNORE_INDEX] * len(ask) + answer
        rows.append(ids)
        label_rows.append(labels)
    length = max(len(r) for r in rows)
    data = {
        "input_ids": [r + [pad_token_id] * (length - len(r)) for r in rows],
        "attention_mask": [[1] * len(r) + [0] * (length - len(r)) for r in rows],
    }
    if answers is not None:
        data["labels"] = [r + [IGNORE_INDEX] * (length - len(r)) for r in label_rows]
    return data


def check_turns(turns, n_prompts: int, with_answers: bool, apply_template: bool, placeholder="<|image|>"):
    """Validate follow-up chat turns (one list per prompt); returns them, or empty lists when None.

    Raises:
        ValueError: turns without answers or template, a count that does not match the prompts, or an
            image placeholder inside a follow-up turn (its images must come with the first message).
    """
    if turns is None:
        return [[] for _ in range(n_prompts)]
    turns = [list(t) for t in turns]
    if len(turns) != n_prompts:
        raise ValueError(f"Got {n_prompts} prompts but {len(turns)} per-prompt turn lists.")
    if any(turns) and not (with_answers and apply_template):
        raise ValueError("Follow-up turns need answers= and the chat template (they are training data).")
    for i, conv in enumerate(turns):
        for user, _ in conv:
            if placeholder in user:
                raise ValueError(
                    f"Prompt {i}: a follow-up turn holds {placeholder}; images go in the first turn."
                )
    return turns


def batch_feature(data: dict, return_tensors: str | None) -> BatchFeature:
    """``data`` as a BatchFeature: lists become long tensors with ``"pt"``, stay lists with None."""
    if return_tensors is None:
        return BatchFeature(data)
    if return_tensors != "pt":
        raise ValueError(f"Only return_tensors='pt' is supported, got {return_tensors!r}.")
    return BatchFeature(
        {k: v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.long) for k, v in data.items()}
    )
