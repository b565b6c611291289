"""Gradient attribution (captum Integrated Gradients) for Owl2 and Owl3, next to the attention view.

One call attributes a target token's logit jointly to the image patches and the prompt tokens:

    attr = attribute(model, batch)                   # batch = processor(text=..., images=[...]), B = 1
    attr.patch_maps     # [N_img, grid_h, grid_w]    IG summed over the patch-embedding channels
    attr.token_scores   # [L_tok]                    IG summed over the token-embedding channels
    attr.delta          # completeness gap: sum(all attributions) - (f(input) - f(baseline))

How (one ``LayerIntegratedGradients`` over two layers, so completeness holds for the *sum* of patch
and token attributions and one integration path serves both):

* image side: the vision tower's patch-embedding conv (Owl2 ``model.vision_model.embeddings
  .patch_embed``, Owl3 ``vision_model.embeddings.patch_embedding``), output [N, C, gh, gw];
* text side: the decoder's token embedding (output [1, L, D]). Owl2 embeds ``input_ids`` with its
  -200 markers set to 0 and then splices image rows in, so embedding rows at markers are never used:
  their attribution is exactly 0 and they are left out of ``token_scores``.

Baselines (the path's start point, documented choice):

* images: all-zero ``pixel_values``, i.e. every pixel at the normalisation mean (a flat mean-colour
  image). Owl2's patch conv has no bias, so its baseline activation is exactly 0; SigLIP's has one.
* text: every prompt token replaced by the pad token (``baseline_token`` overrides it), except
  special tokens (BOS, chat-template markers) and image placeholders, which are kept so the
  baseline is still a well-formed prompt. Kept tokens get exactly 0 attribution by construction.
  A pad *embedding* rather than a zero vector: the baseline must be an input the model can see.

Target: the logit (or log-prob / prob, ``score=``) of one vocabulary token at the last prompt
position, i.e. the first answer token. Default: the model's own greedy next token.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from owl_lab.families import family_of, resolve_path
from owl_lab.models.owl3.media_owl3 import resolve_media

SCORES = ("logit", "logprob", "prob")
METHODS = ("integrated_gradients",)


@dataclass
class Attribution:
    """Integrated-gradients attribution of one target token (batch of one sample).

    Attributes:
        patch_maps: [N_img, grid_h, grid_w] attribution per image patch (sum over channels); N_img = 0
            for text-only prompts.
        token_scores: [L_tok] attribution per prompt token (Owl2: text tokens only, markers dropped).
        tokens: the L_tok token strings; ``token_positions`` [L_tok] their index in ``input_ids``.
        target_id / target: the attributed vocabulary token (id and string).
        score: what was attributed ('logit', 'logprob' or 'prob') — ``value`` at the input,
            ``baseline_value`` at the baseline.
        delta: completeness gap (captum's convergence delta), sum(attributions) - (value - baseline_value).
    """

    patch_maps: torch.Tensor
    token_scores: torch.Tensor
    tokens: list[str]
    token_positions: torch.Tensor
    target_id: int
    target: str
    score: str
    value: float
    baseline_value: float
    delta: float
    n_steps: int
    family: str
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        """Sum of all attributions (≈ value - baseline_value by completeness)."""
        return float(self.patch_maps.sum() + self.token_scores.sum())

    @property
    def image_share(self) -> float:
        """Fraction of the absolute attribution that falls on image patches."""
        a, t = float(self.patch_maps.abs().sum()), float(self.token_scores.abs().sum())
        return a / (a + t) if a + t > 0 else 0.0

    def token_table(self):
        """pandas DataFrame: position, token, score (one row per prompt token)."""
        import pandas as pd

        return pd.DataFrame(
            {
                "position": self.token_positions.tolist(),
                "token": self.tokens,
                "score": self.token_scores.tolist(),
            }
        )


# ---------------------------------------------------------------------------------------------
# family adapters: which layers to attribute at, and a forward that scores k copies of the prompt
# ---------------------------------------------------------------------------------------------


class _Adapter:
    """Per-family: patch layer, embedding layer, kept positions, and ``forward(ids, pixels) -> [k, V]``."""

    def __init__(self, model, batch):
        self.model, self.spec = model, family_of(model)
        self.family = self.spec.name
        ids = batch.get("input_ids")
        if ids is None or ids.dim() != 2 or ids.shape[0] != 1:
            got = None if ids is None else tuple(ids.shape)
            raise ValueError(f"attribute() explains one sample: expected input_ids [1, L], got {got}.")
        mask = batch.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            raise ValueError("attribute() expects an unpadded single sample (attention_mask all ones).")
        self.ids = ids
        self.pixels = batch.get("pixel_values")
        if self.pixels is not None and self.pixels.shape[0] == 0:
            self.pixels = None
        self.patch_layer = resolve_path(model, self.spec, "patch_embed")
        self.embed_layer = resolve_path(model, self.spec, "embed_tokens")
        if self.spec.images_in_sequence:  # the model puts each image's rows at its marker
            marker = self.spec.image_marker(model.config)
            self.image_positions = (ids[0] == marker).nonzero().flatten()
            self.report = ids[0] != marker  # markers have no embedding row in the sequence
        else:
            # images are keys from s_n on, given by the processor's media_offset (Owl3, the one such family)
            self.image_starts = None
            if self.pixels is not None:  # where each image goes: s_n, and which pixel row is image n
                starts, order = resolve_media(batch.get("media_offset"), self.pixels.shape[0], 1, mask)
                self.image_starts, self.order = starts[0][None], order[0]  # [1, N], [N]
            self.image_positions = (
                self.image_starts[0] if self.image_starts is not None else torch.zeros(0, dtype=torch.long)
            )
            self.report = torch.ones_like(ids[0], dtype=torch.bool)

    def forward(self, ids: torch.Tensor, pixels: torch.Tensor | None = None) -> torch.Tensor:
        """ids [k, L] (k copies), pixels [k*N, 3, S, S] (copy-major) → last-position logits [k, V]."""
        k = ids.shape[0]
        if self.spec.images_in_sequence:
            out = self.model(input_ids=ids, pixel_values=pixels, use_cache=False, logits_to_keep=1)
        else:
            kw = {}
            if pixels is not None:
                feats = resolve_path(self.model, self.spec, "encode_images")(pixels)  # [k*N, T, H]
                feats = feats.view(k, -1, *feats.shape[1:])[:, self.order]  # [k, N, T, H], image order
                kw = dict(image_embeds=feats, image_starts=self.image_starts.expand(k, -1))
            out = self.model(input_ids=ids, use_cache=False, logits_to_keep=1, **kw)
        return out.logits[:, -1].float()  # [k, V]


def _resolve_target(target, logits: torch.Tensor, tokenizer) -> int:
    vocab = logits.shape[-1]
    if target is None:
        return int(logits.argmax())
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        if not 0 <= int(target) < vocab:
            raise ValueError(f"target id {target} is outside the vocabulary [0, {vocab}).")
        return int(target)
    if isinstance(target, str):
        if tokenizer is None:
            raise ValueError("a string target needs the processor's tokenizer (pass tokenizer= or an id).")
        pieces = tokenizer(target, add_special_tokens=False).input_ids
        if not pieces:
            raise ValueError(f"target {target!r} tokenizes to nothing.")
        return int(pieces[0])  # the answer's first token: the one predicted at the last prompt position
    raise ValueError(f"target must be None, a token id or a string; got {type(target).__name__}.")


def _score(logits: torch.Tensor, target_id: int, score: str) -> torch.Tensor:
    if score == "logit":
        return logits[:, target_id]
    logp = torch.log_softmax(logits, dim=-1)[:, target_id]
    return logp if score == "logprob" else logp.exp()


def attribute(
    model,
    processor_batch,
    target: str | int | None = None,
    method: str = "integrated_gradients",
    n_steps: int = 32,
    *,
    score: str = "logit",
    tokenizer=None,
    baseline_token: int | None = None,
    internal_batch_size: int | None = None,
    integration: str = "gausslegendre",
) -> Attribution:
    """Attribute a target token's score to image patches and prompt tokens (see module docstring).

    Args:
        model: an Owl2 or Owl3 model (eval mode is fine: gradients are enabled here).
        processor_batch: the processor output for ONE sample: input_ids [1, L], attention_mask [1, L]
            (all ones), pixel_values [N_img, 3, S, S] (+ Owl3 media_offset).
        target: token id, string (its first token) or None = the model's greedy next token.
        method: 'integrated_gradients' (captum LayerIntegratedGradients).
        n_steps: integration steps; the delta shrinks as n_steps grows.
        score: 'logit' (default), 'logprob' or 'prob' of the target.
        tokenizer: the processor or its tokenizer, for token strings, string targets and the
            special tokens kept in the baseline (without it tokens are shown as ids).
        baseline_token: id replacing prompt tokens in the text baseline (default: the pad token).
        internal_batch_size: integration steps per forward (default all n_steps at once).
        integration: captum IG rule ('gausslegendre', 'riemann_trapezoid', ...).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}; got {score!r}.")
    if int(n_steps) < 2:
        raise ValueError(f"n_steps must be >= 2; got {n_steps}.")
    from captum.attr import LayerIntegratedGradients

    t0 = time.perf_counter()
    ad = _Adapter(model, processor_batch)
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor is fine too
    ids = ad.ids
    with torch.no_grad():
        logits = ad.forward(ids, ad.pixels)  # [1, V]
    target_id = _resolve_target(target, logits, tokenizer)

    # text baseline: pad everywhere except special tokens, image markers and placeholders
    keep = torch.zeros_like(ids[0], dtype=torch.bool)
    keep[ad.image_positions] = True
    keep |= ~ad.report  # image marker rows (none where images are not rows)
    special = set(getattr(tokenizer, "all_special_ids", []) or []) - {
        getattr(tokenizer, "pad_token_id", None)
    }
    if special:
        keep |= torch.isin(ids[0], torch.tensor(sorted(special), dtype=ids.dtype))
    pad = baseline_token if baseline_token is not None else getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.config, "pad_token_id", None)
    pad = 0 if pad is None else int(pad)
    base_ids = torch.where(keep[None], ids, torch.full_like(ids, pad))  # [1, L]

    def scored(ids_k, pixels_k=None):  # [k] scores of the target
        return _score(ad.forward(ids_k, pixels_k), target_id, score)

    layers = ([ad.patch_layer] if ad.pixels is not None else []) + [ad.embed_layer]
    inputs = (ids, ad.pixels) if ad.pixels is not None else (ids,)
    baselines = (base_ids, torch.zeros_like(ad.pixels)) if ad.pixels is not None else (base_ids,)
    with warnings.catch_warnings(), torch.enable_grad():
        warnings.filterwarnings("ignore", message="Multiple layers provided")
        lig = LayerIntegratedGradients(scored, layers if len(layers) > 1 else layers[0])
        # (captum's own delta needs every input to share the batch dim; N_img != 1 breaks that, so the
        # completeness gap is computed below from the two end-point scores)
        attrs = lig.attribute(
            inputs,
            baselines=baselines,
            n_steps=int(n_steps),
            method=integration,
            internal_batch_size=internal_batch_size,
        )
        with torch.no_grad():
            value = float(scored(ids, ad.pixels))
            baseline_value = float(scored(*baselines))
    if len(layers) == 1:
        attrs = [attrs]
    emb = attrs[-1].detach()  # [1, L, D]
    token_all = emb[0].sum(-1).float()  # [L]
    if ad.pixels is not None:
        patch = attrs[0].detach().float().sum(1)  # [N, C, gh, gw] → [N, gh, gw]
    else:
        patch = torch.zeros(0, 0, 0)
    positions = ad.report.nonzero().flatten()
    id_list = ids[0, positions].tolist()
    tokens = tokenizer.convert_ids_to_tokens(id_list) if tokenizer is not None else [str(i) for i in id_list]
    target_str = tokenizer.convert_ids_to_tokens(target_id) if tokenizer is not None else str(target_id)
    return Attribution(
        patch_maps=patch.cpu(),
        token_scores=token_all[positions].cpu(),
        tokens=list(tokens),
        token_positions=positions.cpu(),
        target_id=target_id,
        target=str(target_str),
        score=score,
        value=value,
        baseline_value=baseline_value,
        delta=float(patch.double().sum() + token_all.double().sum()) - (value - baseline_value),
        n_steps=int(n_steps),
        family=ad.family,
        seconds=time.perf_counter() - t0,
        extra={
            "baseline_ids": base_ids.cpu(),
            "marker_attribution": float(token_all[~ad.report].abs().sum()),
        },
    )
