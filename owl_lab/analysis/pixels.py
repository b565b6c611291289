"""From an answer token back to pixels: patch-grid maps composed from what ``hooks.capture`` records.

    path = answer_to_pixels(model, processor, example)     # example: .text, .images, .answer
    path.table        # DataFrame: map, image, token, position, layer, gh, gw, weight
    path.maps["composed"]   # [n_tokens, N_img, grid_h, grid_w], all decoder layers aggregated
    path.figure()     # plotly overlay of each map on the image

One teacher-forced forward (prompt + answer) under ``capture`` gives every hop; the maps are then
products of those pieces (for a token at decoder position t predicting answer token a):

* **Owl2** (answer → image rows → abstractor queries → patches):
  ``composed_i[n] = Σ_j d_i[t, (n, j)] · A[n, j, :]`` with ``d_i`` the decoder attention of layer i
  (head mean) on image n's query row j and ``A`` the abstractor's query→patch probabilities (head
  mean, layer ``abstractor_layer``). ``raw_i[n] = (Σ_j d_i[t, (n, j)]) · mean_j A[n, j, :]`` keeps the
  decoder's image mass but forgets *which* rows it read: the one-hop baseline. The ``vit_eos`` row
  has no patch map; its mass is left out.
* **Owl3** (answer → hyper-layer cross-attention → SigLIP patches):
  ``raw_i[n] = c_i[t, n, :]`` the hyper layer's attention on image n's patch keys (head mean);
  ``composed_i = s_i[t] · c_i`` with ``s_i`` the gate's vision share of that layer's output
  (``rec.gate_split``: ‖o_proj(cross·g)‖ / (‖text part‖ + ‖vision part‖)); models without a gate
  (fused / sum) use s = 1, the fused softmax already weighs images against text.
* **patch rows** (LLaVA: one decoder row per patch, no abstractor): ``raw_i[n] = composed_i[n] =
  d_i[t, rows of image n]`` reshaped to the patch grid — the decoder reads the patches directly.
  The stock CLIP tower has no hook points, so there is no rollout map.
* **rollout** (``rollout=True``): the composed map propagated through the vision encoder by
  attention rollout (Abnar & Zuidema 2020): ``R = Π_l (½ A_l + ½ I)`` over the encoder layers whose
  output the bridge reads (head-mean A_l), and a map over encoder output tokens becomes ``m · R``
  over the input patches (Owl2: the abstractor's CLS column is propagated too; the CLS input token
  is a learned embedding, not pixels, so its share is dropped).

Layer aggregate ``"all"`` is the mean over the decoder layers observed (Owl3: the hyper layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from hooks.capture import capture
from hooks.vision import vision_sites
from owl_lab.families import family_of
from owl_lab.viz.pixels import pixel_overlay_figure

MAP_KINDS = ("raw", "composed", "rollout")
PIXEL_COLUMNS = ["map", "image", "token", "position", "layer", "gh", "gw", "weight"]


@dataclass
class PixelPath:
    """Patch-grid maps of chosen answer tokens (T tokens, N images, gh × gw patch grid).

    Attributes:
        maps: kind → [T, N, gh, gw] (layer aggregate ``all``); kinds from :data:`MAP_KINDS`.
        per_layer: kind → [layers, T, N, gh, gw] (order of ``layers``).
        layers: decoder layers that contributed (Owl3: hyper layers).
        tokens: the T answer-token strings; ``positions`` the decoder positions predicting them.
        images: the PIL images (for overlays).
        table: tidy DataFrame (see :data:`PIXEL_COLUMNS`).
    """

    maps: dict
    per_layer: dict
    layers: list
    tokens: list
    positions: list
    images: list
    family: str
    extra: dict = field(default_factory=dict)

    @property
    def table(self) -> pd.DataFrame:
        frames = []
        for kind, stack in self.per_layer.items():
            full = torch.cat([stack, self.maps[kind][None]], 0)  # [layers + 1, T, N, gh, gw]
            names = [*self.layers, "all"]
            L, T, N, gh, gw = full.shape
            idx = np.indices((L, T, N, gh, gw)).reshape(5, -1)
            frames.append(
                pd.DataFrame(
                    {
                        "map": kind,
                        "image": idx[2],
                        "token": np.asarray(self.tokens, dtype=object)[idx[1]],
                        "position": np.asarray(self.positions)[idx[1]],
                        "layer": np.asarray(names, dtype=object)[idx[0]],
                        "gh": idx[3],
                        "gw": idx[4],
                        "weight": full.reshape(-1).numpy(),
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)[PIXEL_COLUMNS]

    def figure(self, token: int = 0, image: int = 0, kinds=None, title: str | None = None):
        """Plotly overlay of the maps of one token on one image (see :mod:`owl_lab.viz.pixels`)."""
        kinds = list(self.maps) if kinds is None else list(kinds)
        maps = {k: self.maps[k][token, image] for k in kinds}
        return pixel_overlay_figure(
            self.images[image], maps, title=title or f"answer token {self.tokens[token]!r} → image {image}"
        )


# ------------------------------------------------------------------------------- positions
def answer_positions(model, batch) -> tuple[list[int], list[int]]:
    """Decoder query positions that predict each answer token (labels != -100), and those token ids.

    A family that expands each image marker into ``tokens_per_image`` rows (Owl2) has positions on the
    expanded sequence (the one ``capture`` reports).
    """
    labels, ids = batch.get("labels"), batch["input_ids"]
    if labels is None or labels.shape[0] != 1:
        raise ValueError("answer_positions needs a one-sample batch built with answers= (labels [1, L]).")
    spec = family_of(model)
    shift = torch.zeros_like(ids[0])
    if spec.expands_image_marker:
        extra = int(model.config.tokens_per_image) - 1  # rows each marker adds
        marker = spec.image_marker(model.config)
        shift = torch.cumsum((ids[0] == marker).long(), 0) * extra  # rows added up to and incl. position p
    where = (labels[0] != -100).nonzero().flatten()
    if where.numel() == 0:
        raise ValueError("the batch has no answer tokens (all labels are -100).")
    positions = [int(p + shift[p]) - 1 for p in where]
    return positions, labels[0, where].tolist()


def rollout(full: torch.Tensor) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): full [layers, N, T, T] head-mean maps → R [N, T, T].

    ``R = Â_L ⋯ Â_1`` with ``Â = ½ A + ½ I`` (rows still sum to 1): row i of R says how much of output
    token i comes from each input token when residual paths count as half of every layer.
    """
    layers, N, T, _ = full.shape
    eye = torch.eye(T).expand(N, T, T)
    out = eye.clone()
    for a in full.float():
        out = (0.5 * a + 0.5 * eye) @ out
    return out


# ------------------------------------------------------------------------------- the main call
def answer_to_pixels(
    model,
    processor,
    example,
    *,
    answer: str | None = None,
    tokens="first",
    rollout_encoder: bool | None = None,
    abstractor_layer: int = -1,
    layers=None,
) -> PixelPath:
    """Maps from chosen answer tokens to each image's patch grid (see the module docstring).

    Args:
        model, processor: an Owl2 / Owl3 model and its processor.
        example: anything with ``.text`` (prompt with ``<|image|>``), ``.images`` and ``.answer``
            (a :class:`owl_lab.synth.Example`).
        answer: the answer to teacher-force (default ``example.answer``).
        tokens: ``"first"`` (the first answer token), ``"all"`` (every answer token incl. eos) or a
            list of answer-token indices.
        rollout_encoder: also compute the ``rollout`` map (captures the encoder's full maps); None =
            whenever the vision encoder has hook points (not a stock LLaVA tower).
        abstractor_layer: Owl2 abstractor layer whose query maps are used (default the last).
        layers: decoder layers to aggregate (default all; Owl3: the hyper layers among them).

    Returns:
        :class:`PixelPath`; ``path.maps[kind]`` [T, N, gh, gw], ``path.table`` tidy.
    """
    spec = family_of(model)
    images = list(example.images)
    if not images:
        raise ValueError("answer_to_pixels needs a prompt with at least one image.")
    observable = bool(vision_sites(model, spec))
    if rollout_encoder and not observable:
        raise ValueError(
            f"rollout_encoder=True, but {type(model).__name__}'s vision encoder has no hook points "
            "(a stock transformers tower): no rollout map"
        )
    rollout_encoder = observable if rollout_encoder is None else rollout_encoder
    batch = processor(
        text=example.text, images=images, answers=answer if answer is not None else example.answer
    )
    positions, token_ids = answer_positions(model, batch)
    chosen = _choose(tokens, len(positions))
    positions, token_ids = [positions[i] for i in chosen], [token_ids[i] for i in chosen]
    seeing = spec.image_layers(model.config)  # decoder layers whose attention can see the image
    asked = seeing if layers is None else sorted(int(i) for i in layers)
    layers = [i for i in asked if i in seeing]
    if not layers:
        raise ValueError(f"no decoder layer to read: only layers {seeing} see the image; got layers={asked}.")
    forward = {k: v for k, v in batch.items() if k != "labels"}
    with (
        torch.no_grad(),
        capture(
            model,
            layers=layers,
            full_maps={i: positions for i in layers},
            vision="full" if rollout_encoder else False,
        ) as rec,
    ):
        model(**forward)
    if rec.abstractor_records:
        per_layer = _owl2_maps(rec, layers, positions, len(images), abstractor_layer, rollout_encoder)
    elif spec.images_in_sequence:  # LLaVA: the image rows are the patches
        per_layer = _patch_row_maps(rec, layers, positions, len(images))
    else:
        per_layer = _owl3_maps(rec, layers, positions, len(images), rollout_encoder)
    tok = getattr(processor, "tokenizer", processor)
    return PixelPath(
        maps={k: v.mean(0) for k, v in per_layer.items()},
        per_layer=per_layer,
        layers=layers,
        tokens=list(tok.convert_ids_to_tokens(token_ids)),
        positions=positions,
        images=images,
        family=spec.name,
    )


def _choose(tokens, n: int) -> list[int]:
    if tokens == "first":
        return [0]
    if tokens == "all":
        return list(range(n))
    chosen = [int(i) for i in ([tokens] if isinstance(tokens, int) else tokens)]
    bad = [i for i in chosen if not -n <= i < n]
    if bad:
        raise ValueError(
            f"answer-token indices {bad} out of range: the answer has {n} tokens (eos included)."
        )
    return [i % n for i in chosen]


def _rows(fm, positions) -> torch.Tensor:
    """Head-mean probabilities of the chosen query positions: [T, Lk]."""
    where = [int((fm.query_index == p).nonzero()[0]) for p in positions]
    return fm.probs[0][:, where].mean(0)  # [T, Lk]


def _owl2_maps(rec, layers, positions, n_img, abstractor_layer, with_rollout) -> dict:
    last = rec.abstractor_records[-1]
    a_rec = last[abstractor_layer]
    patch = a_rec.patch_probs.mean(1)  # [N, Q, gh, gw] head mean
    N, Q, gh, gw = patch.shape
    cls = a_rec.cls_mass.mean(1)  # [N, Q]
    raw, comp, roll = [], [], []
    if with_rollout:
        R = rollout(rec.vision.full[:, -N:])  # [N, T, T] (this forward's images)
        over_tokens = torch.cat([cls[..., None], patch.flatten(2)], -1)  # [N, Q, 1 + gh*gw]
        rolled = torch.einsum("nqt,nts->nqs", over_tokens, R)[..., 1:].view(N, Q, gh, gw)
    for i in layers:
        fm = rec.full_maps[(0, i, "self")]
        p = _rows(fm, positions)  # [T, Lk]
        d = torch.stack(
            [p[:, (fm.key_image[0] == n).nonzero().flatten()[:Q]] for n in range(n_img)], 1
        )  # [T, N, Q]
        comp.append(torch.einsum("tnq,nqhw->tnhw", d, patch))
        raw.append(d.sum(-1)[..., None, None] * patch.mean(1)[None])
        if with_rollout:
            roll.append(torch.einsum("tnq,nqhw->tnhw", d, rolled))
    out = {"raw": torch.stack(raw), "composed": torch.stack(comp)}
    if with_rollout:
        out["rollout"] = torch.stack(roll)
    return out


def _patch_row_maps(rec, layers, positions, n_img) -> dict:
    """One decoder row per patch (LLaVA): the answer's attention on image n's rows is its patch map."""
    maps = []
    for i in layers:
        fm = rec.full_maps[(0, i, "self")]
        p = _rows(fm, positions)  # [T, Lk]
        d = torch.stack([p[:, (fm.key_image[0] == n).nonzero().flatten()] for n in range(n_img)], 1)
        side = int(round(d.shape[-1] ** 0.5))  # [T, N, P] with P = side² patches (square towers)
        if side * side != d.shape[-1]:
            raise ValueError(f"{d.shape[-1]} image rows per image do not form a square patch grid")
        maps.append(d.view(*d.shape[:2], side, side))
    stacked = torch.stack(maps)  # [layers, T, N, gh, gw]
    return {"raw": stacked, "composed": stacked.clone()}


def _owl3_maps(rec, layers, positions, n_img, with_rollout) -> dict:
    split = rec.gate_split
    raw, comp, roll = [], [], []
    R = rollout(rec.vision.full) if with_rollout else None  # [N, P, P] (SigLIP: patches only)
    for i in layers:
        key = next((k for k in ((0, i, "cross"), (0, i, "joint")) if k in rec.full_maps), None)
        if key is None:
            raise ValueError(f"layer {i} recorded no cross/joint attention (no image visible to the answer?)")
        fm = rec.full_maps[key]
        p = _rows(fm, positions)  # [T, Lk]
        c = torch.stack(
            [
                p[:, ((fm.key_image[0] == n) & (fm.key_position[0] < 0)).nonzero().flatten()]
                for n in range(n_img)
            ],
            1,
        )  # [T, N, P]
        P = c.shape[-1]
        g = int(round(P**0.5))
        share = torch.ones(len(positions))
        if len(split):
            rows = split[(split["layer"] == i) & (split["call"] == 0) & (split["step"] == 0)].set_index(
                "query"
            )
            share = torch.tensor([float(rows.loc[t, "vision_share"]) for t in positions])
        raw.append(c.view(-1, n_img, g, g))
        comp.append((share[:, None, None] * c).view(-1, n_img, g, g))
        if with_rollout:
            roll.append(torch.einsum("tnp,nps->tns", share[:, None, None] * c, R).view(-1, n_img, g, g))
    out = {"raw": torch.stack(raw), "composed": torch.stack(comp)}
    if with_rollout:
        out["rollout"] = torch.stack(roll)
    return out
