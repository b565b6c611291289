"""One optimiser step with the loss-curve bookkeeping shared by every training stage."""

from __future__ import annotations

import torch


def apply_step(
    opt: torch.optim.Optimizer,
    loss: torch.Tensor,
    params: list,
    grad_clip: float,
    history: dict,
    global_step: int,
    stage_index: int,
) -> int:
    """Backward ``loss``, clip ``params`` to ``grad_clip``, step ``opt``, append this step to
    ``history`` (keys step / loss / lr / stage, the format of ``loss_curve.json``) and return the
    next global step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    history["step"].append(global_step)
    history["loss"].append(round(loss.item(), 5))
    history["lr"].append(float(f"{opt.param_groups[0]['lr']:.4g}"))
    history["stage"].append(stage_index)
    return global_step + 1
