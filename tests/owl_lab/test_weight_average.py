"""Weight averaging over a stage (owl_lab/weight_average.py, the stage key ``"ema"``)."""

from __future__ import annotations

import pytest
import torch

from owl_lab.train import load_recipe, train
from owl_lab.weight_average import WeightAverage


def _short(recipe: dict, steps: int, **stage_keys) -> dict:
    stage = {**recipe["stages"][0], "steps": steps, **stage_keys}
    return {**recipe, "stages": [stage]}


def test_average_follows_the_ema_formula():
    model = torch.nn.Linear(3, 2)
    avg = WeightAverage(0.75)
    seen = []
    for value in (1.0, 3.0, -2.0):
        with torch.no_grad():
            model.weight.fill_(value)
        seen.append(value)
        avg.update(model)
    expected = (1.0 * 0.75 + 3.0 * 0.25) * 0.75 + -2.0 * 0.25
    avg.load_into(model)
    torch.testing.assert_close(model.weight, torch.full((2, 3), expected))
    assert avg.updates == 3


def test_bad_decay_and_loading_before_any_update_are_clear_errors():
    for decay in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match="ema decay"):
            WeightAverage(decay)
    with pytest.raises(RuntimeError, match="before any update"):
        WeightAverage(0.9).load_into(torch.nn.Linear(2, 2))


def test_trainer_loads_the_stage_average_and_trains_identically_otherwise():
    """A stage with "ema" ends with the average of its per-step weights (the same losses as without it),
    and it differs from the last iterate."""
    base = _short(load_recipe("smoke-owl2"), 12)
    plain = train(base, None, progress=False, evaluate_after=False, threads=1)
    manual = WeightAverage(0.8)
    train(
        base,
        None,
        progress=False,
        evaluate_after=False,
        threads=1,
        callback=lambda step, model, processor: manual.update(model),
        callback_every=1,
    )
    averaged = train(_short(base, 12, ema=0.8), None, progress=False, evaluate_after=False, threads=1)
    assert averaged["_history"]["loss"] == plain["_history"]["loss"]
    got = averaged["_model"].state_dict()
    for name, value in manual.average.items():
        assert torch.equal(got[name], value), name
    last = plain["_model"].state_dict()
    assert any(not torch.equal(got[n], last[n]) for n in last if last[n].dtype.is_floating_point)
