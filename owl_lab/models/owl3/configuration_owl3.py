"""mPLUG-Owl3 configuration: a Qwen2 config plus the SigLIP vision config and the hyper-layer fields.

Reads the official ``config.json`` of every released checkpoint (7B-240728, 7B-241101, 1B/2B-241014):
Qwen2 fields, 1-based ``hyper_layers``, ``vision_config`` (SigLIP) and ``image_size``/``patch_size``.

Three fields are ours. ``save_pretrained`` writes them; official configs do not have them, and the
loader then detects them from the state-dict key names (:func:`detect_variant`):

* ``hyper_attention``: how a hyper layer mixes text and image attention
    - ``"gated"``       7B-240728: separate cross-attention, per-token/head/channel sigmoid gate
                         computed from the self-attention context by ``self_attn.gate_proj.0``
    - ``"static_gate"`` the A' variant: same, but g = sigmoid(``self_attn.gate``), a [H] parameter
    - ``"fused"``       7B-241101: ONE softmax over [visible image keys ; causal text keys], no gate
    - ``"sum"``         the lab's "no gate" ablation: fused = self + cross (separate softmaxes)
* ``mi_rope`` (default True): rotate image keys with MI-RoPE; False = the "no MI-RoPE" ablation.
* ``projector``: ``"linear"`` (``vision2text_model.weight``) or ``"mlp"`` (Linear-GELU-Linear,
  ``vision2text_model.{0,2}.*``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

from transformers import Qwen2Config, SiglipVisionConfig
from transformers.configuration_utils import SubConfigSpec

from owl_lab.models.loading import checkpoint_keys
from owl_lab.models.remote_code import AutoMapConfigMixin

HYPER_ATTENTION_KINDS = ("gated", "static_gate", "fused", "sum")
PROJECTOR_KINDS = ("linear", "mlp")


class Owl3Config(AutoMapConfigMixin, Qwen2Config):
    """Configuration of :class:`~owl_lab.models.owl3.Owl3ForCausalLM` (``model_type="mplugowl3"``).

    Every Qwen2Config field applies to the language model. Extra fields:

    Args:
        vision_config: SigLIP vision tower config (dict or ``SiglipVisionConfig``).
        hyper_layers: **1-based** decoder layer numbers with hyper attention (official convention:
            layer ``i`` (0-based) is a hyper layer iff ``i + 1`` is listed). 240728: [1, 9, 17, 25].
        image_size, patch_size: copied from ``vision_config`` when absent (official behaviour).
        hyper_attention: one of ``"gated"``, ``"static_gate"``, ``"fused"``, ``"sum"`` or None
            (unknown: detect from weights, see :func:`detect_variant`).
        mi_rope: rotate image keys with MI-RoPE (one rotary position per image).
        projector: ``"linear"``, ``"mlp"`` or None (unknown: detect from weights).
    """

    model_type = "mplugowl3"
    auto_map_model = "Owl3ForCausalLM"  # saved config.json: auto_map for trust_remote_code (remote_code.py)
    sub_configs_defaults = {"vision_config": SubConfigSpec(config_class=SiglipVisionConfig)}

    vision_config: dict | SiglipVisionConfig | None = None
    hyper_layers: list[int] | None = None
    image_size: int | None = None
    patch_size: int | None = None
    hyper_attention: str | None = None
    mi_rope: bool = True
    projector: str | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.hyper_layers is None:
            self.hyper_layers = []
        self.hyper_layers = [int(x) for x in self.hyper_layers]
        bad = [x for x in self.hyper_layers if not 1 <= x <= self.num_hidden_layers]
        if bad:
            raise ValueError(
                f"hyper_layers are 1-based decoder layer numbers in [1, {self.num_hidden_layers}]; got {bad}."
            )
        if self.image_size is None:
            self.image_size = self.vision_config.image_size
        if self.patch_size is None:
            self.patch_size = self.vision_config.patch_size
        if self.hyper_attention is not None and self.hyper_attention not in HYPER_ATTENTION_KINDS:
            raise ValueError(
                f"hyper_attention must be one of {HYPER_ATTENTION_KINDS} (or None); "
                f"got {self.hyper_attention!r}."
            )
        if self.projector is not None and self.projector not in PROJECTOR_KINDS:
            raise ValueError(f"projector must be one of {PROJECTOR_KINDS} (or None); got {self.projector!r}.")

    # ---- derived facts ------------------------------------------------------------------------
    @property
    def hyper_layer_indices(self) -> list[int]:
        """0-based decoder layer indices of the hyper layers (``hyper_layers`` minus one)."""
        return sorted(x - 1 for x in self.hyper_layers)

    @property
    def tokens_per_image(self) -> int:
        """SigLIP patches per image = LLM keys per image (27*27 = 729 for 384/378 px, patch 14)."""
        grid = self.vision_config.image_size // self.vision_config.patch_size
        return grid * grid

    @property
    def variant(self) -> str:
        """``"240728"`` for gated/static_gate/sum (strict visibility, position s_n+1), ``"241101"`` for fused.

        (Named ``family`` before: in the lab "family" means owl2 / owl3, see :mod:`owl_lab.families`.)
        """
        return "241101" if self.hyper_attention == "fused" else "240728"

    def to_dict(self):
        out = super().to_dict()
        # The official remote code reads `rope_theta` at the top level; keep it next to rope_parameters.
        rope = out.get("rope_parameters") or {}
        if "rope_theta" in rope:
            out["rope_theta"] = rope["rope_theta"]
        return out


def detect_variant(keys: Iterable[str]) -> dict:
    """Infer ``hyper_attention``, ``projector`` and the hyper layers from state-dict key names.

    Rules (data/reference/owl3/SPEC.md §2.4): any ``self_attn.gate_proj.0.weight`` ⇒ ``"gated"``; any
    ``self_attn.gate`` ⇒ ``"static_gate"``; ``v_kv_proj`` without gate keys ⇒ ``"fused"``;
    ``vision2text_model.0.weight``
    ⇒ ``"mlp"`` projector, ``vision2text_model.weight`` ⇒ ``"linear"``.

    Returns:
        dict with ``hyper_attention``, ``projector`` and ``hyper_layers_0based`` (sorted list).

    Raises:
        ValueError: when the key layout matches none of the known variants.
    """
    keys = list(keys)
    prefix = "language_model.model.layers."
    kv_layers, gated, static = set(), set(), set()
    for k in keys:
        if not k.startswith(prefix):
            continue
        layer, _, rest = k[len(prefix) :].partition(".")
        if rest.startswith("self_attn.v_kv_proj."):
            kv_layers.add(int(layer))
        elif rest.startswith("self_attn.gate_proj.0."):
            gated.add(int(layer))
        elif rest == "self_attn.gate":
            static.add(int(layer))
    problems = []
    if not kv_layers:
        problems.append("no `language_model.model.layers.{i}.self_attn.v_kv_proj.*` key (no hyper layer)")
    if gated and static:
        problems.append(
            f"both gate_proj.0 (layers {sorted(gated)}) and static `gate` (layers {sorted(static)})"
        )
    for name, layers in (("gate_proj.0", gated), ("gate", static)):
        if layers and layers != kv_layers:
            problems.append(
                f"`self_attn.{name}` in layers {sorted(layers)} but v_kv_proj in {sorted(kv_layers)}"
            )
    if "vision2text_model.0.weight" in keys:
        projector = "mlp"
    elif "vision2text_model.weight" in keys:
        projector = "linear"
    else:
        projector = None
        problems.append("no projector key (`vision2text_model.weight` or `vision2text_model.0.weight`)")
    if problems:
        sample = ", ".join(sorted(keys)[:6])
        raise ValueError(
            "Unknown mPLUG-Owl3 key layout: " + "; ".join(problems) + f". First keys: [{sample}]. Expected "
            "240728 (v_kv_proj + gate_proj.0), A' (v_kv_proj + gate) or 241101 (v_kv_proj only)."
        )
    kind = "gated" if gated else "static_gate" if static else "fused"
    return {"hyper_attention": kind, "projector": projector, "hyper_layers_0based": sorted(kv_layers)}


def load_config(directory: str | Path, **overrides) -> Owl3Config:
    """``config.json`` → Owl3Config; variant fields absent from the file are detected from the keys."""
    directory = Path(directory)
    return complete_config(Owl3Config.from_pretrained(str(directory), **overrides), directory)


def complete_config(config: Owl3Config, directory: str | Path) -> Owl3Config:
    """Fill ``hyper_attention`` / ``projector`` from the checkpoint's key names when they are unset."""
    if config.hyper_attention is None or config.projector is None:
        found = detect_variant(checkpoint_keys(directory))
        if found["hyper_layers_0based"] != config.hyper_layer_indices:
            raise ValueError(
                f"config.json hyper_layers {config.hyper_layers} "
                f"(0-based {config.hyper_layer_indices}) disagree "
                f"with the layers that own v_kv_proj weights: {found['hyper_layers_0based']}."
            )
        config = copy.deepcopy(config)
        config.hyper_attention = config.hyper_attention or found["hyper_attention"]
        config.projector = config.projector or found["projector"]
    return config
