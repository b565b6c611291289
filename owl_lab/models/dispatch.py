"""Spreading a loaded model over several devices, CPU RAM and disk, through accelerate.

One meaning for every family (``load_owl(..., device_map=, max_memory=, offload_folder=)``):

* ``device_map`` naming ONE device (None, a device string / index / ``torch.device``, or a dict whose
  values all name that device) is not dispatch: the model is simply loaded there
  (:func:`owl_lab.models.loading.resolve_device`), no accelerate hooks.
* ``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``: accelerate's
  ``infer_auto_device_map`` over the visible GPUs, then CPU, then ``"disk"``, limited by ``max_memory``
  (``{device: bytes or "10GiB"}``) and never splitting a module listed in the model's
  ``_no_split_modules`` (one decoder / vision / abstractor layer). When the plan names a single device
  (e.g. ``"auto"`` on a CPU-only machine with enough RAM) the model is just placed there.
* a dict of module path → device (``"cuda:0"``, ``0``, ``"cpu"``, ``"disk"``): the longest matching
  path wins and ``""`` is the default, so ``{"": "cpu", "model.layers.3": "disk"}`` is a complete plan.
  Every parameter must be covered (ValueError listing the uncovered ones).

Modules on ``"disk"`` have their weights written to ``offload_folder`` (required then) and read back
at each forward; modules on ``"cpu"`` while a GPU computes are streamed to it. Hook points
(:class:`HookPoint` modules) keep firing: accelerate wraps ``forward`` and PyTorch's forward hooks run
around the wrapper, on the device the module computes on.

Peak RAM during loading is the checkpoint's size (the family loaders read it into memory before the
modules on disk are written out), as with a single-device load.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import dispatch_model, infer_auto_device_map
from accelerate.utils import extract_submodules_state_dict, get_balanced_memory, offload_state_dict

#: ``device_map`` strings planned by accelerate
AUTO_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")

__all__ = ["AUTO_STRATEGIES", "needs_dispatch", "complete_device_map", "plan_device_map", "dispatch_loaded"]


def _device_name(device) -> str:
    """Canonical name of a device_map value: ``"disk"``, ``"cpu"``, ``"cuda:0"`` ...; ValueError otherwise."""
    if device == "disk":
        return "disk"
    try:
        name = str(torch.device("cuda", device) if isinstance(device, int) else torch.device(device))
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device_map value {device!r} is not a device (e.g. 'cpu', 'cuda:0', 0, 'disk')."
        ) from err
    if name == "meta":
        raise ValueError(
            "device_map value 'meta' holds no weights; place modules on a device, 'cpu' or 'disk'."
        )
    return name


def needs_dispatch(device_map) -> bool:
    """True when ``device_map`` asks for accelerate (several devices, disk, or an auto strategy)."""
    if isinstance(device_map, str):
        return device_map in AUTO_STRATEGIES or device_map == "disk"
    if isinstance(device_map, dict):
        if not device_map:
            raise ValueError("device_map={} places nothing; give {'': device} or module paths → devices.")
        names = {_device_name(d) for d in device_map.values()}
        return len(names) > 1 or names == {"disk"}
    return False


def complete_device_map(model: torch.nn.Module, device_map: dict) -> dict[str, str]:
    """Expand a partial module-path → device dict into one accelerate accepts (every parameter covered).

    The longest key that is ``path`` or a prefix ``path.`` of a module wins; ``""`` is the default.
    Returns ``{module or tensor path: device}`` with no key below another.

    Raises:
        ValueError: a key that is no module of the model, or parameters no key covers (listed).
    """
    modules = dict(model.named_modules())
    wanted = {str(k): _device_name(v) for k, v in device_map.items()}
    unknown = sorted(k for k in wanted if k not in modules)
    if unknown:
        sample = [n for n in modules if n.count(".") <= 2][:12]
        raise ValueError(
            f"device_map keys {unknown} are not module paths of {type(model).__name__} (e.g. {sample})."
        )

    def has_key_below(path: str) -> bool:
        prefix = f"{path}." if path else ""
        return any(k != path and k.startswith(prefix) for k in wanted)

    plan: dict[str, str] = {}
    uncovered: list[str] = []

    def visit(path: str, module: torch.nn.Module, inherited: str | None) -> None:
        device = wanted.get(path, inherited)
        if not has_key_below(path):
            if device is not None:
                plan[path] = device
            else:
                uncovered.extend(n if not path else f"{path}.{n}" for n, _ in module.named_parameters())
            return
        for name, _ in list(module.named_parameters(recurse=False)) + list(
            module.named_buffers(recurse=False)
        ):
            full = f"{path}.{name}" if path else name
            if device is not None:
                plan[full] = device
            elif name in dict(module.named_parameters(recurse=False)):
                uncovered.append(full)
        for name, child in module.named_children():
            visit(f"{path}.{name}" if path else name, child, device)

    visit("", model, None)
    if uncovered:
        raise ValueError(
            f"device_map leaves {len(uncovered)} parameter(s) without a device, e.g. {uncovered[:8]}; "
            f"add '' as the default device or cover them."
        )
    return plan


def plan_device_map(model: torch.nn.Module, device_map, max_memory: dict | None = None) -> dict[str, str]:
    """The complete module-path → device plan for ``device_map`` (an auto strategy or a dict)."""
    if isinstance(device_map, dict):
        return complete_device_map(model, device_map)
    if device_map == "disk":
        return {"": "disk"}
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    if device_map in ("balanced", "balanced_low_0"):
        max_memory = get_balanced_memory(
            model,
            max_memory=max_memory,
            no_split_module_classes=no_split,
            low_zero=device_map == "balanced_low_0",
        )
    plan = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    return {name: _device_name(device) for name, device in plan.items()}


def dispatch_loaded(
    model: torch.nn.Module,
    device_map,
    *,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> torch.nn.Module:
    """Spread a model loaded on CPU according to ``device_map`` (see the module docstring).

    Returns the same model with accelerate's hooks attached (``model.hf_device_map`` holds the plan),
    or simply moved when the plan names one device.

    Raises:
        ValueError: a bad map (unknown module paths, uncovered parameters, non-device values) or
            modules on ``"disk"`` without ``offload_folder``.
    """
    plan = plan_device_map(model, device_map, max_memory)
    devices = set(plan.values())
    if "disk" in devices and offload_folder is None:
        on_disk = sorted(k for k, v in plan.items() if v == "disk")
        raise ValueError(
            f"device_map puts {on_disk[:6]} on 'disk': give offload_folder= (a directory to write them to)."
        )
    if len(devices) == 1 and devices != {"disk"}:
        model.to(next(iter(devices)))
        return model
    if plan.get("") == "disk":  # accelerate offloads named submodules: name the top-level ones
        plan = complete_device_map(
            model, {"": "disk", **{name: "disk" for name, _ in model.named_children()}}
        )
    on_disk = [name for name, device in plan.items() if device == "disk"]
    if on_disk:
        # Written here on every load: accelerate would silently reuse an index.json already in the folder
        # (stale weights of an earlier load); same names are overwritten.
        Path(offload_folder).mkdir(parents=True, exist_ok=True)
        offload_state_dict(str(offload_folder), extract_submodules_state_dict(model.state_dict(), on_disk))
    model = dispatch_model(
        model, device_map=plan, offload_dir=str(offload_folder) if offload_folder else None
    )
    model.hf_device_map = plan
    return model.eval()
