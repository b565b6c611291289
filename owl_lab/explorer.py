"""The notebook-12 explorer's engine: pick a model, a synthetic scene and a prompt; see where attention goes.

Design rule: everything the widgets show comes from one pure function, so tests (and nbval, where no
JavaScript runs) call it directly::

    state = ExplorerState(model="owl2-tiny", task="color", scene=3, layer=2)
    view = explore(state)          # ExplorerView: answer, numbers, plotly figures
    view.figures["layer_mass"].show()

``owl_lab.widgets.explorer_app()`` only wires ipywidgets controls to ``ExplorerState`` and renders
``explore``'s result. Models are loaded lazily through :func:`owl_lab.load_owl` and cached.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from hooks.capture import capture
from owl_lab.analysis.mass import layer_mass, query_mass
from owl_lab.families import FamilySpec, family_of, get_family
from owl_lab.synth import eval_set
from owl_lab.viz import abstractor_map_figure, gate_heatmap_figure, layer_mass_figure, query_mass_figure
from owl_lab.viz.pixel_picker import PixelView, answer_pixels_view
from owl_lab.zoo import load_owl, native_render_size, resolve_checkpoint


@dataclass
class ExplorerState:
    """Everything the explorer's controls set.

    Attributes:
        model: a shipped checkpoint name (``owl_lab.list_checkpoints()``) or a checkpoint directory.
        task, scene, seed: the example ``owl_lab.synth.eval_set(task, scene + 1, seed)[scene]``.
        prompt: the user message; empty = the example's question. Missing ``<|image|>`` placeholders
            for the example's images are prepended.
        layer: decoder layer; head: attention head or None (mean over heads).
        token: query position in the sequence the decoder sees (Owl2: image rows included), or None
            for the last prompt position (the one that predicts the answer).
        kind: attention kind at ``layer`` ('self', 'cross', 'joint'), None = the one that sees images.
        max_new_tokens: answer length limit (greedy decoding).
        answer_token: the ``pixels`` panel's answer token (index into the example's answer tokens, end
            token included; 0 = the first, predicted at the last prompt position).
        pixel_map: the ``pixels`` panel's map: one of :data:`PIXEL_MAPS` (``all`` = side by side).
    """

    model: str = ""
    task: str = "color"
    scene: int = 0
    seed: int = 0
    prompt: str = ""
    layer: int = 0
    head: int | None = None
    token: int | None = None
    kind: str | None = None
    max_new_tokens: int = 8
    answer_token: int = 0
    pixel_map: str = "composed"


#: choices of the pixels panel (owl_lab.analysis.pixels: decoder mass only / composed path / + ViT rollout)
PIXEL_MAPS = ("composed", "raw", "rollout", "all")


@dataclass
class ExplorerView:
    """What :func:`explore` returns: the answer, printable numbers and plotly figures.

    ``figures`` keys: ``layer_mass`` (mass per layer), ``token_mass`` (per query, chosen layer/head),
    ``token_keys`` (the chosen token's attention over every key), plus ``image`` (the example's
    images, when it has any), ``abstractor`` (Owl2 with an image) or ``gates`` (Owl3 gated hyper layers),
    and ``pixels`` (with an image: the answer token's map over the image, ``pixels`` has its numbers).
    """

    state: ExplorerState
    family: str
    prompt: str
    answer: str
    expected: str
    labels: list[str]
    numbers: dict
    figures: dict[str, go.Figure]
    images: list = field(default_factory=list)
    pixels: PixelView | None = None

    def summary(self) -> str:
        """One line a notebook can print (rounded numbers)."""
        nums = ", ".join(f"{k}={round(v, 3) if isinstance(v, float) else v}" for k, v in self.numbers.items())
        return f"answer {self.answer!r} (expected {self.expected!r}); {nums}"


class ModelCache:
    """Lazily loaded (model, processor) pairs keyed by resolved checkpoint directory."""

    def __init__(self):
        self._models: dict[Path, tuple] = {}

    def get(self, name_or_path: str):
        if not str(name_or_path).strip():
            raise ValueError("choose a model: a shipped checkpoint name or a checkpoint directory.")
        key = resolve_checkpoint(name_or_path).resolve()
        if key not in self._models:
            model, processor = load_owl(key)
            if processor is None:
                raise ValueError(f"{key} has no tokenizer files; the explorer needs a processor.")
            self._models[key] = (model.eval(), processor)
        return self._models[key]

    def __len__(self) -> int:
        return len(self._models)


DEFAULT_CACHE = ModelCache()


@lru_cache(maxsize=64)
def example(task: str, scene: int, seed: int = 0, render_size: int = 112):
    """The seeded synthetic example ``scene`` of ``task`` (cached), its images rendered at ``render_size``
    px (the same scene at every size: the seed fixes the scene, the size only its drawing)."""
    if scene < 0:
        raise ValueError(f"scene must be >= 0; got {scene}.")
    return eval_set(task, scene + 1, seed=seed, render_size=render_size)[scene]


def decoder_shape(model) -> tuple[int, int]:
    """(decoder layers, attention heads) of any family (LLaVA keeps them in its text config)."""
    text = model.config.get_text_config()
    return int(text.num_hidden_layers), int(text.num_attention_heads)


def sequence_labels(
    family: str | FamilySpec, input_ids: torch.Tensor, tokenizer, tokens_per_image: int, config=None
) -> list[str]:
    """Label of every position the decoder sees (input_ids [L]): token strings; where the family expands
    each image marker into rows inside the model (Owl2), those rows as ``img0:q3`` / ``img0:eos``."""
    spec = get_family(family)
    if not spec.expands_image_marker:
        return tokenizer.convert_ids_to_tokens(input_ids.tolist())
    labels, n = [], 0
    for i in input_ids.tolist():
        if i == spec.image_marker(config):
            labels += [f"img{n}:q{j}" for j in range(tokens_per_image - 1)] + [f"img{n}:eos"]
            n += 1
        else:
            labels.append(tokenizer.convert_ids_to_tokens(i))
    return labels


def _pick_kind(df: pd.DataFrame, layer: int, kind: str | None) -> str:
    have = set(df.loc[df["layer"] == layer, "kind"].astype(str))
    if not have:
        raise ValueError(f"layer {layer} does not exist; layers are {sorted(df['layer'].unique())}.")
    if kind is not None:
        if kind not in have:
            raise ValueError(f"layer {layer} has attention kinds {sorted(have)}; got kind={kind!r}.")
        return kind
    return next(k for k in ("joint", "cross", "self") if k in have)


def _image_figure(images, title: str) -> go.Figure:
    """The example's images side by side (one go.Image per image)."""
    fig = make_subplots(rows=1, cols=len(images), subplot_titles=[f"image {i}" for i in range(len(images))])
    for i, image in enumerate(images, start=1):
        fig.add_trace(go.Image(z=np.asarray(image.convert("RGB"))), row=1, col=i)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    fig.update_layout(title=title, template="plotly_white", height=260, width=60 + 200 * len(images))
    return fig


def _key_figure(full_map, head, labels: list[str], title: str) -> tuple[go.Figure, float]:
    probs = full_map.probs[0, :, 0]  # [H, Lk] one query
    p = probs.mean(0) if head is None else probs[head]
    names, n_seen = [], {}
    for pos, img in zip(full_map.key_position[0].tolist(), full_map.key_image[0].tolist(), strict=True):
        if pos >= 0:
            names.append(f"{pos}:{labels[pos]}")
        else:  # Owl3 image key outside the sequence: image n, patch j
            j = n_seen[img] = n_seen.get(img, -1) + 1
            names.append(f"img{img}:p{j}")
    groups = [full_map.groups[g] if g >= 0 else "pad" for g in full_map.key_group[0].tolist()]
    visual = float(sum(v for v, g in zip(p.tolist(), groups, strict=True) if g.startswith("image")))
    colors = ["#f28e2b" if g.startswith("image") else "#4e79a7" for g in groups]
    fig = go.Figure(go.Bar(x=list(range(len(names))), y=p.tolist(), marker_color=colors, hovertext=names))
    fig.update_xaxes(tickvals=list(range(len(names))), ticktext=names, tickangle=-60)
    fig.update_layout(title=title, template="plotly_white", height=360, yaxis_title="attention probability")
    return fig, visual


def explore(state: ExplorerState, cache: ModelCache | None = None) -> ExplorerView:
    """Run the model on the state's example and build every figure and number (no widgets involved)."""
    model, processor = (cache if cache is not None else DEFAULT_CACHE).get(state.model)
    spec = family_of(model)
    # the size the checkpoint was trained on: llava-tiny's processor halves 96-px renders exactly, but
    # resizing 112 px to its 48 px blurs away the 1-px pattern bands (zoo.native_render_size)
    ex = example(state.task, int(state.scene), int(state.seed), native_render_size(state.model))
    prompt = state.prompt.strip() or ex.text
    missing = len(ex.images) - prompt.count("<|image|>")
    if missing > 0:
        prompt = "<|image|>" * missing + prompt
    batch = processor(text=prompt, images=list(ex.images) or None)
    ids = batch["input_ids"]

    n_layers, n_heads = decoder_shape(model)
    if not 0 <= state.layer < n_layers:
        raise ValueError(f"layer must be in [0, {n_layers}); got {state.layer}.")
    if state.head is not None and not 0 <= state.head < n_heads:
        raise ValueError(f"head must be None (mean) or in [0, {n_heads}); got {state.head}.")
    labels = sequence_labels(
        spec, ids[0], processor.tokenizer, getattr(model.config, "tokens_per_image", 1), model.config
    )
    token = len(labels) - 1 if state.token is None or state.token < 0 else int(state.token)
    if token >= len(labels):
        raise ValueError(
            f"token must be a position in [0, {len(labels)}) (or None = last); got {state.token}."
        )

    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=int(state.max_new_tokens), do_sample=False)
        answer = processor.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        with capture(model, full_maps={state.layer: [token]}) as rec:
            model(**batch)
    df = rec.attention_mass
    kind = _pick_kind(df, state.layer, state.kind)
    figures, numbers = {}, {"correct": answer == ex.answer}
    if ex.images:
        figures["image"] = _image_figure(
            list(ex.images), f"{state.task} scene {state.scene} (seed {state.seed})"
        )

    # attention mass by layer (modality level); gated Owl3 has no image keys in `self`: add the gate share
    decoder_kinds = [k for k in ("self", "joint") if k in set(df["kind"].astype(str))]
    tables = {"decoder attention mass": layer_mass(df, kind=decoder_kinds, groups=["visual", "text"])}
    if len(rec.gate_records):
        split = rec.gate_split
        share = split[split["applied"]].groupby("layer")["vision_share"].mean()
        tables["gated fusion: vision share of output"] = pd.DataFrame({"visual": share, "text": 1 - share})
        numbers["gate_vision_share"] = float(share.mean())
    figures["layer_mass"] = layer_mass_figure(tables, title="where attention goes, by layer")
    numbers["visual_share_layer"] = float(tables["decoder attention mass"].loc[state.layer, "visual"])

    # per-token mass at the chosen layer / head / kind
    rows = df if state.head is None else df[df["head"] == state.head]
    tq = query_mass(rows, layer=state.layer, kind=kind, level="token")
    who = "mean over heads" if state.head is None else f"head {state.head}"
    figures["token_mass"] = query_mass_figure(
        tq, title=f"layer {state.layer} ({kind}), {who}: mass per query"
    )
    fm = rec.full_maps.get((0, state.layer, kind))
    if fm is not None and fm.probs.shape[2] == 1:
        figures["token_keys"], visual = _key_figure(
            fm, state.head, labels, f"token {token} {labels[token]!r}: attention over keys ({kind}, {who})"
        )
        numbers["token_visual_mass"] = visual

    if len(rec.abstractor_records):  # only families with an abstractor record any
        figures["abstractor"] = abstractor_map_figure(
            rec.abstractor_maps, image=ex.images[0], title="abstractor queries → patches (last layer)"
        )
    if len(rec.gate_records):
        hyper = sorted(rec.gates["layer"].unique())
        layer = state.layer if state.layer in hyper else int(hyper[0])
        figures["gates"] = gate_heatmap_figure(rec.gates, layer=layer, token_labels=labels)
    pixels = None
    if ex.images:  # the composed answer → pixels map at the chosen layer (when it reads images, else all)
        if state.pixel_map not in PIXEL_MAPS:
            raise ValueError(f"pixel_map must be one of {PIXEL_MAPS}; got {state.pixel_map!r}.")
        pixels = answer_pixels_view(
            model,
            processor,
            replace(ex, text=prompt),
            token=int(state.answer_token),
            layer=state.layer if state.layer in spec.image_layers(model.config) else "all",
            occlusion=False,
            kinds=None if state.pixel_map == "all" else [state.pixel_map],
        )
        figures["pixels"] = pixels.figure
    return ExplorerView(
        state=state,
        family=spec.name,
        prompt=prompt,
        answer=answer,
        expected=ex.answer,
        labels=labels,
        numbers=numbers,
        figures=figures,
        images=list(ex.images),
        pixels=pixels,
    )
