"""``hooks.capture``: observe an Owl model's attention, gates and abstractor inside a ``with`` block.

    with capture(model) as rec:
        model(**batch)                      # or model.generate(**batch, max_new_tokens=8)
    rec.attention_mass                      # batch, step, layer, head, query, kind, level, group, mass

The model hands its exact attention inputs to ``HookPoint`` modules (:mod:`owl_lab.models.observe`);
capture registers forward hooks on them for the duration of the block, reduces each event on the
spot (query-chunked, see :mod:`hooks.attention`) and keeps only the small results. All hooks are
removed when the block ends, also when it raises. Hooks only read, so the numbers never change.

Arguments ``gates`` and ``abstractor``: ``None`` (default) = capture it if the model has it,
``True`` = required (ValueError if the model has none, e.g. gates on Owl2 or fused Owl3 241101),
``False`` = off. No model has both, so ``gates=True, abstractor=True`` together (the form of the
lab's design contract) means "the family's own internals": whichever of the two the model has is captured,
and neither being present is not an error (attention is still recorded).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from hooks.abstractor import summarize_abstractor
from hooks.attention import grouped_mass
from hooks.gates import summarize_gate
from hooks.groups import (
    MODALITY_GROUPS,
    N_TOKEN_FIXED,
    SequenceHistory,
    coarsen_to_modality,
    group_vocabulary,
    key_groups,
    token_groups,
)
from hooks.recording import AttentionRecord, FullMap, Recording
from hooks.reductions import allowed_rows, choose_queries, head_subset, parse_reductions
from hooks.vision import VisionView, parse_vision, summarize_vision, vision_sites
from owl_lab.families import FamilySpec, family_of, find_sites
from owl_lab.models.observe import AttentionEvent, GateEvent, SequenceLayout

DECODER_KINDS = ("self", "cross", "joint")
QuerySelector = None | int | slice | Iterable


def _gated(model, spec: FamilySpec, gate_sites) -> tuple[bool, str]:
    """(has a gate?, why not). Owl3 240728-style hyper layers only (``hyper_attention`` 'gated', or
    'static_gate' whose g is a parameter); not Owl2, not fused 241101, not the 'sum' ablation."""
    if not spec.has("gate_event"):
        return False, f"{spec.name} has no adaptive gate (only mPLUG-Owl3 240728 gated hyper layers do)"
    kind = getattr(model.config, "hyper_attention", None)
    if kind is not None and kind not in ("gated", "static_gate"):
        how = "one fused softmax over image and text keys" if kind == "fused" else f"{kind!r} mixing"
        return False, f"its hyper layers use {how} (hyper_attention={kind!r}), there is no gate g"
    if not gate_sites:
        return False, "it has no hook_gate_event points (no gated hyper layer among the captured layers)"
    return True, ""


def _parse_full_maps(full_maps, layers: list[int]) -> dict[int, QuerySelector]:
    if full_maps is None:
        return {}
    if isinstance(full_maps, int):
        full_maps = [full_maps]
    chosen = dict(full_maps) if isinstance(full_maps, dict) else {int(i): None for i in full_maps}
    unknown = sorted(set(chosen) - set(layers))
    if unknown:
        raise ValueError(f"full_maps asks for layers {unknown}; captured decoder layers are {layers}")
    return chosen


def _select_rows(selector: QuerySelector, query_index: torch.Tensor) -> torch.Tensor:
    """Local rows of ``query_index`` (absolute positions [Lq]) picked by a full_maps selector."""
    qi = query_index.cpu()
    if selector is None:
        return torch.arange(qi.numel())
    if isinstance(selector, slice):
        lo = selector.start or 0
        hi = selector.stop if selector.stop is not None else int(qi.max()) + 1 if qi.numel() else 0
        keep = (qi >= lo) & (qi < hi)
        if selector.step not in (None, 1):
            keep &= (qi - lo) % selector.step == 0
        return keep.nonzero().squeeze(-1)
    wanted = torch.tensor([selector] if isinstance(selector, int) else list(selector), dtype=torch.long)
    return torch.isin(qi, wanted).nonzero().squeeze(-1)


class capture:
    """Context manager recording attention mass, gates and abstractor maps of an Owl model.

    Args:
        model: a model of a registered family (:mod:`owl_lab.families`; Owl2, Owl3).
        attention: record attention mass per token group for every decoder layer / head / query.
        gates: Owl3 240728 gate values and text/vision output split (None = if present).
        abstractor: Owl2 abstractor query→patch maps (None = if present).
        layers: decoder layers to observe (default: all); others are not even hooked.
        full_maps: layers whose full probabilities to keep: an int, a list of layers (all queries)
            or ``{layer: queries}`` with queries None (all), an absolute position, a slice or a list
            of positions. Stored in ``rec.full_maps[(call, step, layer, kind)]`` (``(step, layer, kind)``
            reads call 0).
        gate_vectors: also keep full gate vectors [B, L, H, D] and both output parts.
        vision: the vision encoder's attention (kind ``vision``, :mod:`hooks.vision`) in ``rec.vision``:
            False (default, off), True = per-query mass on CLS / local / far patches, ``"grid"`` = also
            the received attention per patch, ``"full"`` = also head-mean [T, T] maps (for rollout).
        chunk_bytes: size budget of one score chunk (default: the size of the event's q tensor,
            clamped to [1 MB, 8 MB]).
        heads: in-hook head reduction of the attention mass: None (all heads), ``"mean"`` (mean
            over heads, ``head`` = -1 in the table) or a list of head indices (only those are computed).
        queries: in-hook query selection: None (all), ``"last"`` (each sample's last real query),
            absolute positions (int / list; negative = from the end), a ``slice`` of positions, or
            ``fn(query_index [Lq], token_kind [B, Lq]) -> bool [Lq] | [B, Lq]``. Other rows are
            never computed. See :mod:`hooks.reductions` (also for the memory per table row).
    """

    def __init__(
        self,
        model,
        attention: bool = True,
        gates: bool | None = None,
        abstractor: bool | None = None,
        layers: Iterable[int] | None = None,
        full_maps=None,
        gate_vectors: bool = False,
        chunk_bytes: int | None = None,
        heads=None,
        queries=None,
        vision: bool | str = False,
    ):
        self.model = model
        n_heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
        self.reductions = parse_reductions(heads, queries, n_heads if isinstance(n_heads, int) else None)
        spec = family_of(model)
        self.family = spec.name
        if spec.prepare is not None:  # a stock transformers model: install its observation points
            spec.prepare(model)
        self._layout_sites = find_sites(model, spec, "layout")
        if not self._layout_sites:
            raise ValueError(f"{type(model).__name__} has no hook_layout point; is it an owl_lab model?")
        attn_sites = find_sites(model, spec, "attention_event")
        available = [s.index for s in attn_sites]
        if layers is None:
            chosen = available
        else:
            chosen = sorted({int(i) for i in ([layers] if isinstance(layers, int) else layers)})
            missing = sorted(set(chosen) - set(available))
            if missing:
                raise ValueError(f"layers {missing} do not exist; the decoder has layers {available}")
        self.layers = chosen
        self._attn_sites = [s for s in attn_sites if s.index in chosen] if attention else []

        gate_sites = [s for s in find_sites(model, spec, "gate_event") if s.index in chosen]
        has_gates, why = _gated(model, spec, gate_sites)
        either = gates is True and abstractor is True  # "whatever this family has" (see module doc)
        if gates and not has_gates and not either:
            raise ValueError(f"gates=True, but the model has no gate to capture: {why}.")
        self._gate_sites = gate_sites if (gates is not False and has_gates) else []

        abs_sites = find_sites(model, spec, "abstractor_event")
        if abstractor and not abs_sites and not either:
            raise ValueError(
                f"abstractor=True, but the model has no visual abstractor ({self.family}; only "
                "mPLUG-Owl2 has one)."
            )
        self._abs_sites = abs_sites if abstractor is not False else []
        self._full_maps = _parse_full_maps(full_maps, chosen)
        self.gate_vectors = gate_vectors
        self.chunk_bytes = chunk_bytes
        self._vision = parse_vision(vision)
        self._vision_sites = vision_sites(model, spec) if self._vision else []
        if self._vision and not self._vision_sites:
            raise ValueError(
                f"vision={vision!r}, but {type(model).__name__} has no vision attention hook points"
            )
        self._handles: list = []
        self.recording: Recording | None = None

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> Recording:
        if self._handles:
            raise RuntimeError("this capture is already active")
        self.recording = Recording(self.family)
        self.recording.vision = VisionView(self._vision)
        self._history = SequenceHistory()
        self._step, self._call = -1, -1
        self._groups: dict = {}
        try:
            for site in self._layout_sites:
                self._handles.append(site.module.register_forward_hook(self._hook_layout))
            for site in self._attn_sites:
                self._handles.append(site.module.register_forward_hook(self._hook_attention))
            for site in self._gate_sites:
                self._handles.append(site.module.register_forward_hook(self._hook_gate))
            for site in self._abs_sites:
                self._handles.append(site.module.register_forward_hook(self._hook_abstractor))
            for site in self._vision_sites:
                self._handles.append(site.module.register_forward_hook(self._hook_vision))
        except BaseException:
            self._remove()
            raise
        return self.recording

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._remove()
        rec = self.recording
        rec.token_kind, rec.image_index = self._history.kind, self._history.image
        rec._changed()
        self._history, self._groups = None, {}
        return False

    def _remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    # ------------------------------------------------------------------ hook bodies
    def _hook_layout(self, module, args, output):
        layout = args[0]
        if not isinstance(layout, SequenceLayout):
            raise TypeError(f"hook_layout expects a SequenceLayout, got {type(layout).__name__}")
        self._history.update(layout)
        if int(layout.past_length) == 0 or self._call < 0:  # a prefill starts a new call
            self._call, self._step = self._call + 1, 0
        else:
            self._step += 1
        self._groups = {}
        self.recording.n_steps += 1
        self.recording.n_calls = self._call + 1

    def _hook_attention(self, module, args, output):
        event = args[0]
        if not isinstance(event, AttentionEvent) or event.kind not in DECODER_KINDS:
            raise TypeError(
                f"decoder hook_attn expects an AttentionEvent of kind {DECODER_KINDS}, got {event!r:.80}"
            )
        if self._step < 0:
            raise RuntimeError("an attention event arrived before the model emitted its SequenceLayout")
        hist = self._history
        n_img = max([0, *hist.images_per_sample, int(hist.image.max()) + 1, int(event.key_image.max()) + 1])
        cache_key = (event.kind, tuple(event.key_position.shape), n_img)
        cached = self._groups.get(cache_key)
        kp, ki = event.key_position.detach().cpu(), event.key_image.detach().cpu()
        if cached is not None and torch.equal(cached[0], kp) and torch.equal(cached[1], ki):
            kg = cached[2]
        else:
            kg = key_groups(hist, kp, ki, n_img)  # [B, Lk] token-level group ids
            self._groups[cache_key] = (kp, ki, kg)
        # Compute only the token groups that have keys in this call (Owl3 self-attention has no
        # image keys, so 64 images would otherwise mean 64 all-zero columns per layer).
        used = torch.unique(kg[kg >= 0])  # sorted token-group ids present among the keys
        compact = torch.full((N_TOKEN_FIXED + n_img,), -1, dtype=torch.long)
        compact[used] = torch.arange(used.numel())
        kg_used = torch.where(kg >= 0, compact[kg.clamp(min=0)], -1)  # [B, Lk] ids into `used`
        valid_q = hist.valid_queries(event.query_index)  # [B, Lq]
        selector_given = event.layer in self._full_maps
        select = _select_rows(self._full_maps[event.layer], event.query_index) if selector_given else None
        reduced = self._reduce_event(event, valid_q, select)
        if reduced is None:
            return  # no chosen query in this call (e.g. a position slice outside a decode step)
        query, key, probs, lse, allowed, row_mask, select, mass_rows, query_index, head_ids = reduced
        res = grouped_mass(
            query,
            key,
            event.scale,
            allowed,
            kg_used.to(query.device),
            used.numel(),
            probs=probs,
            logsumexp=lse,
            row_mask=row_mask,
            select=select,
            chunk_bytes=self.chunk_bytes,
        )
        res_mass, has_keys = res.mass, res.has_keys.cpu()
        if mass_rows is not None:  # drop rows computed only for full_maps
            res_mass, has_keys, row_mask = (
                res_mass[:, :, mass_rows],
                has_keys[:, mass_rows],
                row_mask[:, mass_rows],
            )
        if self.reductions.heads == "mean":  # in fp32 (fp64 for fp64 models), before any row exists
            res_mass = res_mass.mean(1, keepdim=True)
        tok = res_mass.float().cpu()  # [B, H', Lq', G_used]
        seen = torch.zeros(kg.shape[0], used.numel() + 1)
        seen.scatter_add_(1, torch.where(kg_used < 0, used.numel(), kg_used), res.seen.cpu().float())
        seen = seen[:, :-1] > 0  # [B, G_used] groups with a key some valid query may see
        coarse = coarsen_to_modality(n_img)[used]  # [G_used, 3] token group → modality group
        mod_used = coarse.sum(0) > 0
        coarse = coarse[:, mod_used]
        mass = torch.cat([tok @ coarse, tok], dim=-1)  # [B, H, Lq, G]: modality level, then token level
        present = torch.cat([(seen.float() @ coarse) > 0, seen], dim=-1)  # [B, G]
        all_levels, all_names = group_vocabulary(n_img)
        n_mod = len(MODALITY_GROUPS)
        cols = [i for i in range(n_mod) if mod_used[i]] + [n_mod + int(g) for g in used]
        keep = present.any(0)  # drop groups no sample reports (e.g. pad keys nobody attends)
        mass, present = mass[..., keep], present[:, keep]
        levels = [all_levels[c] for c, k in zip(cols, keep.tolist(), strict=True) if k]
        names = [all_names[c] for c, k in zip(cols, keep.tolist(), strict=True) if k]
        rec = self.recording
        rec.attention_records.append(
            AttentionRecord(
                step=self._step,
                call=self._call,
                layer=int(event.layer),
                kind=event.kind,
                mass=mass,
                query_index=query_index,
                valid=row_mask & has_keys,
                present=present,
                levels=levels,
                groups=names,
                heads=head_ids,
            )
        )
        if selector_given:
            full_index = event.query_index.detach().cpu()[
                _select_rows(self._full_maps[event.layer], event.query_index)
            ]
            rec.full_maps[(self._call, self._step, int(event.layer), event.kind)] = FullMap(
                probs=res.maps.float().cpu(),
                query_index=full_index,
                key_position=kp,
                key_image=ki,
                key_group=kg,
                groups=token_groups(n_img),
            )
        rec._changed()

    def _reduce_event(self, event, valid_q: torch.Tensor, select: torch.Tensor | None):
        """Apply ``heads`` / ``queries`` to one event before anything is computed.

        Returns None when no row is to be computed, else (query, key, probs, logsumexp, allowed,
        row_mask [B, n],
        select (rows into the computed ones), mass_rows (computed rows kept in the table, None = all),
        query_index [n'] of the kept rows, head_ids [H'] (None = all heads, -1 = mean)).
        """
        query, key, probs, allowed = event.query, event.key, event.probs, event.allowed
        lse = getattr(event, "logsumexp", None)  # [B, H, Lq] from the SDPA kernel, or None
        query_index = event.query_index.detach().cpu().long()
        row_mask, mass_rows, head_ids = valid_q, None, None
        red = self.reductions
        if isinstance(red.heads, tuple):
            query, key, probs = head_subset(query, key, probs, red.heads)
            if lse is not None:
                lse = lse.index_select(1, torch.tensor(red.heads, dtype=torch.long, device=lse.device))
            if getattr(allowed, "per_head", False):  # a per-head knockout's mask: the same heads
                full, picked = allowed, list(red.heads)
                allowed = lambda q0, q1: full(q0, q1)[:, picked]  # noqa: E731
            head_ids = torch.tensor(red.heads, dtype=torch.long)
        elif red.heads == "mean":
            head_ids = torch.tensor([-1], dtype=torch.long)
        if red.queries is not None:
            kinds = self._history.kind[:, query_index]  # [B, Lq]
            rows, keep = choose_queries(red.queries, query_index, valid_q, kinds, self._history.length)
            computed = rows if select is None else torch.unique(torch.cat([rows, select.cpu()]))  # sorted
            if computed.numel() == 0:
                return None
            mass_rows = torch.searchsorted(computed, rows)
            if select is not None:
                select = torch.searchsorted(computed, select.cpu())
            row_mask = torch.zeros(valid_q.shape[0], computed.numel(), dtype=torch.bool)
            row_mask[:, mass_rows] = keep & valid_q[:, rows]
            dev_rows = computed.to(query.device)
            query = query.index_select(2, dev_rows)
            probs = None if probs is None else probs.index_select(2, dev_rows)
            lse = None if lse is None else lse.index_select(2, dev_rows.to(lse.device))
            allowed = allowed_rows(allowed, computed)
            query_index = query_index[rows]
        return query, key, probs, lse, allowed, row_mask, select, mass_rows, query_index, head_ids

    def _hook_gate(self, module, args, output):
        event = args[0]
        if not isinstance(event, GateEvent):
            raise TypeError(f"hook_gate expects a GateEvent, got {type(event).__name__}")
        if self._step < 0:
            valid = torch.ones(event.gate.shape[:2], dtype=torch.bool)
        else:
            valid = self._history.valid_queries(event.query_index)
        self.recording.gate_records.append(
            summarize_gate(event, max(self._step, 0), valid, self.gate_vectors, call=max(self._call, 0))
        )
        self.recording._changed()

    def _hook_abstractor(self, module, args, output):
        event = args[0]
        if not isinstance(event, AttentionEvent) or event.kind != "abstractor":
            raise TypeError(
                f"abstractor hook_attn expects an AttentionEvent of kind 'abstractor', got {event!r:.80}"
            )
        calls = self.recording.abstractor_records
        if not calls or event.layer == 0 or any(r.layer == event.layer for r in calls[-1]):
            calls.append([])
        calls[-1].append(summarize_abstractor(event, self.chunk_bytes))
        self.recording._changed()

    def _hook_vision(self, module, args, output):
        event = args[0]
        if not isinstance(event, AttentionEvent) or event.kind != "vision":
            raise TypeError(f"vision hook_attn expects an AttentionEvent of kind 'vision', got {event!r:.80}")
        self.recording.vision.add(summarize_vision(event, self._vision, self.chunk_bytes))
