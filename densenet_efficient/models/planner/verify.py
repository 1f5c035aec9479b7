"""``model.fit_memory(..., verify=True)``: run the fitted step for real and step the plan down while
it is over the budget.

The planner is calibrated to be an upper bound of the measured step (docs/planner.md), but a
GPU adds what no tensor count sees: the caching allocator's rounding and fragmentation, cuDNN
workspaces chosen at run time, other tensors of the process. Verification measures them: two
training steps on a random batch (the second with the momentum buffers the first one made),
``torch.cuda.max_memory_reserved`` over them plus the CUDA context the planner assumes. Weights,
buffers, gradients and the training flag are restored afterwards.

It is CUDA-only: on CPU, peak RSS of the calling process mixes in everything else it ever
allocated and glibc keeps freed memory unless started with ``MALLOC_MMAP_THRESHOLD_``, so an
in-process figure would not be the step's; the planner's CPU figure is checked against
fresh-process measurements instead (``scripts/planner_grid.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import UsageError
from ..memory_plan import MemoryPlan
from .allocator import CUDA_CONTEXT
from .options import OPTIMIZER_STATES
from .search import MemoryBudgetError, fit_memory
from .units import format_bytes, parse_memory

__all__ = ["MAX_VERIFY_ROUNDS", "fit_model", "measure_step", "step_down"]

#: How many times a plan is stepped down before verification gives up.
MAX_VERIFY_ROUNDS = 4


def step_down(
    fit: Callable[[int], MemoryPlan], measure: Callable[[MemoryPlan], int], budget: int
) -> MemoryPlan:
    """The plan ``fit(budget')`` for the largest ``budget' <= budget`` whose measured step fits.

    ``fit`` plans for a budget (raising :class:`MemoryBudgetError` below the floor), ``measure``
    runs a plan and returns its real bytes. Each round that measures over ``budget`` plans again for
    a budget lowered by the excess (the bytes the planner did not see), with a warning saying so.
    """
    target, measured = budget, ""
    for _ in range(MAX_VERIFY_ROUNDS):
        try:
            plan = fit(target)
        except MemoryBudgetError as err:
            if not measured:
                raise
            raise MemoryBudgetError(
                f"{measured}, and {err}", floor=err.floor, max_batch_size=err.max_batch_size
            ) from None
        real = measure(plan)
        if real <= budget:
            return plan
        estimated = plan.estimated_peak or target
        # plan so that the planner's figure plus what it did not see (real - estimated) fits
        target = min(target - 1, budget - (real - estimated))
        measured = (
            f"fit_memory(verify=True): the step of {plan} measured {format_bytes(real)}, over the budget of "
            f"{format_bytes(budget)} (planner: {format_bytes(estimated)})"
        )
        if target <= 0:
            break
        warnings.warn(f"{measured}; planning again for {format_bytes(target)}", stacklevel=3)
    raise UsageError(
        f"{measured}; no plan measured within {format_bytes(budget)} after {MAX_VERIFY_ROUNDS} rounds: "
        "give a larger budget or a smaller batch"
    )


def measure_step(
    model: nn.Module, plan: MemoryPlan, *, batch_size: int, image_size: int, amp: str | None, optimizer: str
) -> int:
    """Bytes the device holds during two training steps of ``model`` run with ``plan`` (CUDA only).

    The model's state is left as it was: parameters and buffers are copied to the host first and
    restored, gradients put back, the plan it had set and every module's train/eval mode again. A
    model whose features are frozen runs them in eval mode, as ``train --freeze-features`` does.
    """
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise UsageError(
            "fit_memory(verify=True) measures the step on CUDA (torch.cuda.max_memory_reserved); this "
            f"model is on {device.type}: move it to the GPU first, or fit without verify (the CPU "
            "figure is calibrated against fresh-process measurements: scripts/planner_grid.py)"
        )
    saved = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    grads = [p.grad for p in model.parameters()]
    modes, old_plan = [(m, m.training) for m in model.modules()], model.memory_plan
    frozen = _frozen(model)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp or "")
    states = OPTIMIZER_STATES[optimizer]
    opt = None
    try:
        model.set_memory_efficient(plan).train()
        if frozen:  # as train --freeze-features runs them: batch norms with their running statistics
            model.features.eval()
        for p in model.parameters():
            p.grad = None
        opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9) if states else None
        x = torch.randn(batch_size, model.arch_config.in_chans, image_size, image_size, device=device)
        if _channels_last(model):  # the batch in the layout the model was converted to
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, model.num_classes, (batch_size,), device=device)
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(2):
            with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            if opt is not None:
                opt.step()
        torch.cuda.synchronize(device)
        # Adam keeps two buffers where the SGD used here keeps one: count the second one too
        trained = [p for p in model.parameters() if p.requires_grad]
        extra = sum(p.numel() * p.element_size() for p in trained) * max(states - 1, 0)
        real = torch.cuda.max_memory_reserved(device) + extra + CUDA_CONTEXT
    finally:
        del opt
        model.load_state_dict(saved)
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g
        model.set_memory_efficient(old_plan)
        for m, training in modes:  # each module's mode as it was (frozen features stay in eval)
            m.training = training
        torch.cuda.empty_cache()
    return real


_DTYPES = {torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _sync_world_size(model: nn.Module) -> int:
    """The ranks ``model``'s batch norms synchronise over in training (1: plain batch norm)."""
    from ..engine import sync

    groups = [sync.process_group([m]) for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm))]
    return max((torch.distributed.get_world_size(g) for g in groups if g is not None), default=1)


def _channels_last(model: nn.Module) -> bool:
    """Whether ``model`` was converted to ``torch.channels_last`` (its convolutions' weights wider
    than 1x1 laid out so: a 1x1 weight reads as both formats)."""
    wide = [p for p in model.parameters() if p.dim() == 4 and p.shape[-2:] != (1, 1)]
    return bool(wide) and all(p.is_contiguous(memory_format=torch.channels_last) for p in wide)


def _frozen(model: nn.Module) -> bool:
    """Whether ``model``'s features are frozen as ``train --freeze-features`` freezes them (none of
    their parameters takes a gradient) while something else (the classifier) still trains."""
    features = list(model.features.parameters())
    trained = [p for p in model.parameters() if p.requires_grad]
    return bool(features) and bool(trained) and not any(p.requires_grad for p in features)


def fit_model(
    model: nn.Module,
    budget: int | str,
    *,
    batch_size: int,
    image_size: int | None,
    amp: str | None,
    optimizer: str,
    device: str | None,
    verify: bool,
) -> MemoryPlan:
    """What :meth:`DenseNet.fit_memory` returns (it applies it): the plan :func:`fit_memory` picks
    for the model's architecture, its parameters' dtype, layout (``channels_last`` when the model was
    converted to it), dropout, frozen features (when none of them takes a gradient) and device
    (unless ``device`` is given),
    stepped down on CUDA while its measured step exceeds the budget (``verify``). A model whose
    batch norms synchronise over a process group (:func:`~densenet_efficient.convert_sync_batchnorm`)
    is planned with that group's synchronised step."""
    param, world = next(model.parameters()), _sync_world_size(model)
    if verify and world > 1:
        raise UsageError(
            "fit_memory(verify=True) measures training steps on this process alone, and this model's "
            "batch norms synchronise over a process group (every rank would have to measure them "
            "together): plan without verify, or verify the unconverted model"
        )
    kwargs = dict(
        batch_size=batch_size, image_size=image_size, amp=amp, optimizer=optimizer,
        device=device or param.device.type, dtype=_DTYPES.get(param.dtype, "fp32"), sync_bn_world_size=world,
        channels_last=_channels_last(model), drop_rate=getattr(model, "drop_rate", 0.0),
        freeze_features=_frozen(model),
    )  # fmt: skip
    config = model.arch_config
    plan = fit_memory(config, budget, **kwargs)
    if not verify:
        return plan
    if kwargs["device"] != "cuda":
        raise UsageError(
            "fit_memory(verify=True) measures the step on CUDA; on CPU the planner's figure is "
            "checked against fresh-process measurements instead (docs/planner.md)"
        )

    def measure(p: MemoryPlan) -> int:
        return measure_step(
            model, p, batch_size=batch_size, image_size=plan.image_size, amp=amp, optimizer=optimizer
        )

    return step_down(lambda b: fit_memory(config, b, **kwargs), measure, parse_memory(budget))
