"""An exponential moving average (EMA) of a model's weights over one training stage (opt-in).

A stage with ``"ema": DECAY`` (0 < DECAY < 1) keeps, after every optimiser step, the average
``avg ← DECAY · avg + (1 − DECAY) · weights`` (started from the weights after the stage's first step)
and loads it into the model when the stage ends, so the next stage, the checkpoint and the evaluation
see the average instead of the last iterate. Its horizon is about ``1 / (1 − DECAY)`` steps (0.998:
500). Every floating-point tensor of the state dict is averaged, frozen ones included: a constant's
average equals it up to float rounding. Costs one multiply-add over the weights per step (< 1 ms for
a tiny model). Stages without the key train bit-for-bit as before.
"""

from __future__ import annotations

import torch


class WeightAverage:
    """EMA of the state dict's float tensors: ``update`` after each step, ``load_into`` at the end."""

    def __init__(self, decay: float) -> None:
        if not 0.0 < float(decay) < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.average: dict[str, torch.Tensor] | None = None
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Fold the model's current weights into the average (the first call copies them)."""
        state = model.state_dict()
        if self.average is None:
            self.average = {k: v.detach().clone() for k, v in state.items()}
        else:
            for k, v in state.items():
                if v.dtype.is_floating_point:
                    self.average[k].mul_(self.decay).add_(v, alpha=1 - self.decay)
        self.updates += 1

    @torch.no_grad()
    def load_into(self, model: torch.nn.Module) -> None:
        """Replace the model's weights by the average; raises RuntimeError before any ``update``."""
        if self.average is None:
            raise RuntimeError("WeightAverage.load_into before any update")
        model.load_state_dict(self.average)
