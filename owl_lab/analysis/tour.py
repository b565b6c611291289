"""Architecture tours: the live tensor shape at every stage of an Owl forward, as a table.

Notebooks 01 (Owl2) and 02 (Owl3) print these tables for a real processor batch, so the shapes a
reader sees are the ones the checkpoint actually produces, not numbers copied from a paper.
"""

from __future__ import annotations

import pandas as pd
import torch

from owl_lab.families import OWL2, OWL3, resolve_path


def _row(stage: str, tensor_or_shape, note: str) -> dict:
    shape = tuple(tensor_or_shape.shape) if hasattr(tensor_or_shape, "shape") else tuple(tensor_or_shape)
    return {"stage": stage, "shape": "×".join(str(s) for s in shape), "what": note}


@torch.no_grad()
def owl2_stages(model, batch) -> pd.DataFrame:
    """Shapes through mPLUG-Owl2: pixels → ViT (CLS kept) → abstractor queries → Q+1 LLM rows →
    expanded sequence with modality indicators → logits.

    Args:
        model: an ``Owl2ForCausalLM``.
        batch: a processor output with ``input_ids`` [B, L] (image markers = -200),
            ``attention_mask`` and ``pixel_values`` [N, 3, S, S].
    """
    cfg = model.config
    pixels = batch["pixel_values"]
    vit = resolve_path(model, OWL2, "vision_tower")(pixels).last_hidden_state  # [N, 1 + g*g, Dv]
    abstractor = resolve_path(model, OWL2, "bridge")(vit)
    queries = abstractor.layer_outputs[-1]  # [N, Q, Da]
    rows_llm = abstractor.features  # [N, Q+1, D]
    seq = model.model.build_sequence(batch["input_ids"], pixels, batch.get("attention_mask"))
    logits = model(**batch).logits
    marker = OWL2.image_token_id
    n_vision = int(seq.modality_indicators.eq(1).sum())
    grid = cfg.vision_settings.image_size // cfg.vision_settings.patch_size
    return pd.DataFrame(
        [
            _row("pixel_values", pixels, f"{pixels.shape[0]} image(s), {pixels.shape[-1]} px, CLIP mean/std"),
            _row("ViT output", vit, f"CLS + {grid}×{grid} patches, post-LayerNorm on every token"),
            _row(
                "abstractor queries",
                queries,
                f"{queries.shape[1]} learnable queries after {len(abstractor.layer_outputs)} layers",
            ),
            _row(
                "visual_fc + vit_eos", rows_llm, f"{rows_llm.shape[1]} LLM rows per image (queries + vit_eos)"
            ),
            _row(
                "input_ids",
                batch["input_ids"],
                f"{int(batch['input_ids'].eq(marker).sum())} image marker(s) = {marker}",
            ),
            _row("decoder sequence", seq.inputs_embeds, "each marker replaced by its image's rows"),
            _row(
                "modality indicators",
                seq.modality_indicators,
                f"{n_vision} vision (1) rows, {seq.modality_indicators.numel() - n_vision} text (0) rows",
            ),
            _row("logits", logits, "one row per position of the expanded sequence"),
        ]
    )


@torch.no_grad()
def owl3_stages(model, batch) -> pd.DataFrame:
    """Shapes through mPLUG-Owl3: pixels → SigLIP hidden_states[-2] → projector → image K/V that
    only hyper layers read; the text sequence keeps its length.

    Args:
        model: an ``Owl3ForCausalLM``.
        batch: a processor output with ``input_ids`` [B, L], ``attention_mask``, ``pixel_values``
            [N, 3, S, S] and ``media_offset``.
    """
    cfg = model.config
    pixels = batch["pixel_values"]
    feats = model.encode_images(pixels)  # [N, T, H]
    _, starts = model.prepare_images(
        pixels, batch.get("media_offset"), batch["input_ids"].shape, batch.get("attention_mask")
    )
    layer = resolve_path(model, OWL3, "attention", i=cfg.hyper_layer_indices[0])
    kv = layer.v_kv_proj(feats)  # [N, T, 2*nKV*D]
    logits = model(**batch).logits
    grid = cfg.vision_config.image_size // cfg.vision_config.patch_size
    return pd.DataFrame(
        [
            _row(
                "pixel_values", pixels, f"{pixels.shape[0]} image(s), {pixels.shape[-1]} px, mean = std = 0.5"
            ),
            _row(
                "image features",
                feats,
                f"SigLIP hidden_states[-2] ({grid}×{grid} patches) → {cfg.projector} projector",
            ),
            _row("input_ids", batch["input_ids"], "text only: the <|image|> placeholder stays ordinary text"),
            _row("placeholder starts s_n", starts, "where each image becomes visible"),
            _row(
                "visual K|V (hyper layer)",
                kv,
                f"v_kv_proj on the shared-normed features; hyper layers {cfg.hyper_layer_indices} (0-based)",
            ),
            _row("logits", logits, "same length as input_ids: no visual tokens in the sequence"),
        ]
    )
