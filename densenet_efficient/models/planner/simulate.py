"""The training step run on phantom tensors, with the bytes alive after every op counted.

No formula of the engine lives here: the model is built on the meta device, its parameters and
buffers become phantom CPU tensors (:mod:`.phantom`: shapes, dtypes, strides and storages of the
right size, no data), and the step that will really run (forward, cross-entropy, backward, the
optimizer's step with its state) runs on them under :class:`LiveBytes`, a dispatch mode that
counts every storage an op creates and, through a weak reference, every one that dies, as
``torch.distributed._tools.mem_tracker.MemTracker`` does (:func:`run_step`, which tests also run
on real tensors and compare op by op). The engine runs as its Python reference
(:func:`~densenet_efficient.models.engine.reference_engine`), whose allocations are those of the
C++ loops line for line and, unlike the custom ops', all visible to a dispatch mode.

Synchronised batch norm (``sync_bn_world_size > 1``): the simulated model's batch norms are converted
(:func:`~densenet_efficient.convert_sync_batchnorm`) and the engine's synchronised path runs as it
will on every rank, its collectives simulated (:func:`simulated_collectives`): each returns a fresh
tensor of the size the real one returns, so the gathered statistics, the reduced sums and the
synchronised backward's temporaries are all counted, by the engine's own ops.

One simulation gives the step at every batch size. The batch is a prime larger than any other
dimension, so a storage scales with the batch exactly when its size is a multiple of that prime;
every count is kept as ``fixed + per_image * batch`` (:class:`Line`), and the peak at a batch is
the largest of those lines there (the op at which memory peaks may change with the batch).

Each dense block and transition is a *segment*: :class:`Segment` keeps what it adds to the bytes
alive when it ends its forward, and the most it needs above its start in forward and in backward.
:mod:`.compose` adds segments of different simulations to price a plan without simulating it.

>>> from densenet_efficient.models.config import densenet_bc_config
>>> sim = simulate(densenet_bc_config(40), "efficient", image_size=32)
>>> sim.peak(64) > sim.peak(16) > sim.persistent.at(16)
True
"""

from __future__ import annotations

import contextlib
import functools
import gc
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.adam import adam
from torch.optim.sgd import sgd
from torch.overrides import TorchFunctionMode

from ...errors import check_int
from ..config import ArchConfig
from ..engine import reference_engine, sync
from ..memory_plan import MemoryPlan, resolve_memory_plan
from ..registry import model_class
from ..sync_batchnorm import convert_sync_batchnorm
from .allocator import cpu_scratch
from .options import TORCHVISION, TORCHVISION_EFFICIENT
from .phantom import Phantom, PhantomMode, first, leaves, only_values, per_op, phantom, run
from .shortcut import Shortcut

__all__ = [
    "Line",
    "LiveBytes",
    "Segment",
    "SimulatedGroup",
    "Simulation",
    "check_sync_world",
    "simulate",
    "simulated_collectives",
    "simulation_batch",
]

#: Where the CUDA caching allocator rounds every block to (``kMinBlockSize``): a tensor of n bytes
#: holds ``ceil(n / 512) * 512`` on the device. Applied per storage when simulating for CUDA.
CUDA_BLOCK = 512


@dataclass(frozen=True, order=True)
class Line:
    """Bytes as ``fixed + per_image * batch``."""

    fixed: int
    per_image: int

    def at(self, batch: int) -> int:
        return self.fixed + self.per_image * batch

    def __add__(self, other: Line) -> Line:
        return Line(self.fixed + other.fixed, self.per_image + other.per_image)

    def __sub__(self, other: Line) -> Line:
        return Line(self.fixed - other.fixed, self.per_image - other.per_image)


ZERO = Line(0, 0)


def upper_hull(lines: list[Line]) -> tuple[Line, ...]:
    """The lines that are the largest at some batch >= 1 (the rest never decide a maximum)."""
    best: dict[int, int] = {}
    for ln in lines:  # per slope, the largest intercept
        if ln.fixed > best.get(ln.per_image, -(1 << 62)):
            best[ln.per_image] = ln.fixed
    kept: list[Line] = []
    for slope in sorted(best):
        ln = Line(best[slope], slope)
        # at batch 1 (and beyond) a steeper line that is also higher makes the others useless
        kept = [k for k in kept if k.at(1) > ln.at(1)]
        kept.append(ln)
    return tuple(kept)


def hull_max(lines: tuple[Line, ...], batch: int) -> int:
    return max(ln.at(batch) for ln in lines) if lines else 0


class LiveBytes(PhantomMode):
    """Counts the bytes of every storage alive, as (fixed, per image), after each op.

    ``batch``: the prime that marks a batch-sized storage (its bytes are a multiple of it).
    ``round_to``: allocation granularity (1 on CPU, :data:`CUDA_BLOCK` for the caching allocator).
    ``shortcut``: makes the outputs of ops whose meta kernel is Python or missing
    (:class:`.shortcut.Shortcut`).
    ``phantom``: whether a tensor made from none (``torch.empty(...)``) is a phantom one (the
    simulated step) or a real one (a step on real tensors).
    ``trace`` holds (fixed, per_image) after every op; :meth:`mark` names a moment of it.
    """

    def __init__(
        self, batch: int, round_to: int = 1, scratch: Any = None, shortcut: Any = None, phantom: bool = False
    ) -> None:
        super().__init__(phantom, self._shortcut)
        self.batch, self.round_to, self.scratch, self.shortcut = batch, round_to, scratch, shortcut
        # storage id -> its counted size; the weak reference's callback takes it off when it dies
        # (before the id can be reused: the callback runs as the storage is freed)
        self.sizes: dict[int, tuple[int, int]] = {}
        self.refs: dict[int, weakref.ref] = {}
        self.fixed = self.per = 0
        self.trace: list[tuple[int, int]] = []

    def _split(self, nbytes: int) -> tuple[int, int]:
        n = -(-nbytes // self.round_to) * self.round_to
        if nbytes and nbytes % self.batch == 0:
            return 0, n // self.batch
        return n, 0

    def track(self, t: torch.Tensor) -> None:
        """Count ``t``'s storage, once, until it dies (a resized one at its new size)."""
        st = (t.elem if isinstance(t, Phantom) else t).untyped_storage()
        key, new = id(st), self._split(st.nbytes())
        old = self.sizes.get(key)
        if old == new:
            return
        if old is None:
            self.refs[key] = weakref.ref(st, functools.partial(self._freed, key))
            old = (0, 0)
        self.sizes[key] = new
        self.fixed += new[0] - old[0]
        self.per += new[1] - old[1]

    def _freed(self, key: int, ref: weakref.ref) -> None:
        size = self.sizes.pop(key, None)
        self.refs.pop(key, None)
        if size is not None:
            self.fixed -= size[0]
            self.per -= size[1]

    def mark(self) -> int:
        """The index of the current moment in ``trace``."""
        self.trace.append((self.fixed, self.per))
        return len(self.trace) - 1

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if only_values(func, args):  # nothing to count: no storage changes
            self.trace.append((self.fixed, self.per))
            return first(func, args)
        out = run(func, args, kwargs or {}, self.kernel, self.factories)
        if type(out) is Phantom and _view(func):  # shares its input's storage, counted when made
            self.trace.append((self.fixed, self.per))
            return out
        for t in (out,) if isinstance(out, torch.Tensor) else leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        for t in leaves(kwargs) if kwargs else ():  # out= arguments may have been resized
            if isinstance(t, torch.Tensor):
                self.track(t)
        hidden = self.scratch(func, args) if self.scratch is not None else 0
        if hidden:  # the backend's copies of batch tensors, alive with the op's outputs until it returns
            self.trace.append((self.fixed, self.per + -(-hidden // self.batch)))
        self.trace.append((self.fixed, self.per))
        return out

    def _shortcut(self, func: Any, args: tuple, kwargs: dict) -> Any:
        return NotImplemented if self.shortcut is None else self.shortcut(func, args, kwargs, self.batch)

    def line(self, i: int) -> Line:
        return Line(*self.trace[i])

    def hull(self, start: int, stop: int, base: Line = ZERO) -> tuple[Line, ...]:
        """The upper hull of the trace over ``[start, stop]``, less ``base``."""
        pts = {self.trace[i] for i in range(start, stop + 1)}
        return upper_hull([Line(f, p) - base for f, p in pts])


@per_op
def _view(func: Any) -> bool:
    """Whether ``func`` is a view (``slice``, ``as_strided``, ``detach``...): its outputs alias an
    input (``Tensor(a)``) and it writes nothing."""
    schema = func._schema
    if any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
        return False
    return bool(schema.returns) and all(r.alias_info is not None for r in schema.returns)


@dataclass(frozen=True)
class Segment:
    """One dense block or transition in one simulated setting, relative to the bytes alive when
    its forward starts: ``kept`` is what it adds by the time the next segment starts (what it
    saves, its output, less an input it does not keep), ``forward``/``backward`` the upper hulls of
    what it needs above its start while it runs."""

    name: str
    kept: Line
    forward: tuple[Line, ...]
    backward: tuple[Line, ...]


@dataclass(frozen=True)
class Simulation:
    """A simulated step. ``persistent``: parameters, buffers, gradients, optimizer state and the
    batch; ``activations``: what is alive more at the end of forward (the loss computed);
    ``trace``: the upper hull of the whole run; ``segments``: per dense block and transition;
    ``stem``/``head``/``optimizer``: the hulls of the rest, relative to the start of forward
    (stem), the end of the last segment's forward (head: norm5, pooling, classifier, loss and
    their backward) and to nothing (the optimizer's step, after backward). ``gathers`` and
    ``all_reduces``: the synchronised batch norms' collectives in the step (0 without them)."""

    persistent: Line
    parameters: int
    gradients: int
    optimizer_state: int
    inputs: Line
    activations: Line
    trace: tuple[Line, ...]
    segments: tuple[Segment, ...] = ()
    stem: tuple[Line, ...] = ()
    stem_kept: Line = ZERO
    head: tuple[Line, ...] = ()
    optimizer: tuple[Line, ...] = ()
    gathers: int = 0
    all_reduces: int = 0

    def peak(self, batch: int) -> int:
        """Bytes alive at the step's peak for ``batch`` images."""
        return hull_max(self.trace, batch)


def simulation_batch(config: ArchConfig, image_size: int, sync_bn_world_size: int = 1) -> int:
    """A prime above every channel count, the class count, the input size and the ranks a batch
    norm gathers from: a storage's size is a multiple of it exactly when it holds one slice per image."""
    n = simulation_batch_floor(config, image_size, sync_bn_world_size) | 1
    while any(n % d == 0 for d in range(3, int(n**0.5) + 1, 2)):
        n += 2
    return n


def simulation_batch_floor(config: ArchConfig, image_size: int, sync_bn_world_size: int = 1) -> int:
    """What :func:`simulation_batch` is at least, without searching for its prime (trial division
    up to its square root: hours for a width or an image size of 10**18)."""
    widest = config.num_init_features + sum(config.block_config) * config.growth_rate
    bound = max(
        widest, config.bn_size * config.growth_rate, config.num_classes, image_size, sync_bn_world_size, 3
    )
    return bound * 4


#: What initialises parameters: torch.nn.init's functions and the in-place fills they end in.
_INIT = frozenset(
    [getattr(torch.nn.init, name) for name in dir(torch.nn.init) if name.endswith("_") and not name.startswith("_")]
    + [torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.fill_, torch.Tensor.zero_]
)


class _Uninitialised(TorchFunctionMode):
    """While the simulated model is built on the meta device, initialising a parameter does nothing: meta
    tensors have no values, and torch's init functions run Python decompositions on them (0.2 s
    for densenet201)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in _INIT:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


@functools.lru_cache(maxsize=16)
def _phantom_model(
    config: ArchConfig, torchvision: str | None, dtype: str, channels_last: bool, synchronised: bool = False,
    drop_rate: float = 0.0,
) -> nn.Module:  # fmt: skip
    """The model with phantom CPU parameters and buffers: built on the meta device (nothing is
    allocated or initialised for real), then converted; reused by every simulation of it.
    ``synchronised``: its batch norms converted as ``train --sync-bn`` converts them (a model of
    its own: the plain one stays plain). ``drop_rate``: dropout after each dense layer (its masks
    are kept for backward)."""
    with torch.device("meta"), _Uninitialised():
        if torchvision is not None:
            from ..reference import torchvision_densenet  # imports torchvision: only when asked

            efficient = torchvision == "torchvision_efficient"
            model = torchvision_densenet(config, memory_efficient=efficient, drop_rate=drop_rate)
        else:
            model = model_class()(**config.to_kwargs(), drop_rate=drop_rate)
    param_dtype = _DTYPES[dtype]

    def convert(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and t.dtype != param_dtype:
            t = t.to(param_dtype)
        t = t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t
        return phantom(t)

    with PhantomMode():
        model = model._apply(convert)
        return convert_sync_batchnorm(model) if synchronised else model


_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


#: One simulation at a time: the shortcut's patterns and the cached phantom models are shared.
_LOCK = threading.Lock()

#: Outputs for the ops whose meta kernels are Python or missing (:mod:`.shortcut`), their patterns
#: kept between simulations.
SHORTCUT = Shortcut()


#: The most processes a synchronised simulation takes: beyond any process group that trains one
#: model, and it keeps the simulation's prime (above the world size) quick to find.
MAX_SYNC_WORLD = 1 << 20


def check_sync_world(value: Any) -> int:
    """``sync_bn_world_size`` checked: the processes whose batch norms synchronise (1: plain)."""
    return check_int(value, "sync_bn_world_size", maximum=MAX_SYNC_WORLD)


class SimulatedGroup(sync.StandInGroup):
    """The process group a simulated step's synchronised batch norms synchronise over: ``world``
    ranks, none of them real; counts the collectives the step issues through it."""

    def __init__(self, world: int) -> None:
        super().__init__(world)
        self.gathers = self.all_reduces = 0

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        self.gathers += 1
        return super().all_gather(t)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        self.all_reduces += 1
        return super().all_reduce(t)


@contextlib.contextmanager
def simulated_collectives(world: int) -> Iterator[SimulatedGroup]:
    """Within, in this thread: converted batch norms (:class:`~densenet_efficient.SyncBatchNorm2d`)
    in training synchronise over a :class:`SimulatedGroup` of ``world`` ranks, whatever process
    group exists (:func:`..engine.sync.stand_in`). Its gather returns a fresh ``world``-times-larger
    tensor and its all-reduce a fresh one of its input's shape, as the functional collectives do
    (their values are never read on phantom tensors). Other threads are not affected.

    >>> with simulated_collectives(4) as group:
    ...     sync._all_gather(torch.zeros(3), group).shape
    torch.Size([12])
    >>> group.gathers
    1
    """
    with sync.stand_in(SimulatedGroup(check_sync_world(world))) as group:
        yield group


@contextlib.contextmanager
def _no_collection() -> Iterator[None]:
    """Python's cyclic garbage collector off while a step is simulated: the step's tensors are
    freed when their last reference goes (what the simulation counts; none lives in a cycle,
    tests/models/test_planner.py holds the simulation equal to the real step), and a collection
    would only scan the objects torch and the model already hold: 0.25-0.3 s of densenet201's
    first simulation in a process. Whether it was on is restored."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def simulate(
    config: ArchConfig,
    setting: MemoryPlan | str,
    *,
    image_size: int,
    dtype: str = "fp32",
    amp: str | None = None,
    optimizer: str = "momentum",
    channels_last: bool = False,
    device: str = "cpu",
    regime: int = 16,
    sync_bn_world_size: int = 1,
    drop_rate: float = 0.0,
    freeze_features: bool = False,
) -> Simulation:
    """Simulate one steady training step of ``config`` run with ``setting`` (anything the model's
    ``memory_efficient`` takes, or ``"torchvision"``/``"torchvision_efficient"`` for torchvision's
    own DenseNet).

    The step is the whole-step protocol's second one: parameters with zeroed gradients and the
    optimizer's state already made (one optimizer step runs first), then forward, cross-entropy,
    backward and the optimizer's step. ``device="cuda"`` rounds every storage as the caching
    allocator does; the ops are simulated on CPU (the same shapes; autocast's CPU op lists).
    ``regime``: a batch size for what depends on it beyond the bytes (on CPU, ATen's choice of
    oneDNN for a convolution: 1, below 16 or not; see :func:`.allocator.regime`).
    ``sync_bn_world_size``: above 1, every batch norm synchronised over that many processes, as
    ``train --sync-bn`` runs under torchrun (:func:`simulated_collectives`); ``gathers`` and
    ``all_reduces`` of the result count the collectives. ``drop_rate``: the model's dropout
    after each dense layer (``DenseNet(drop_rate=...)``, ``train --drop-rate``).
    ``freeze_features``: only the classifier trains (``train --freeze-features``: the features take
    no gradient and keep their batch statistics); the result has no segments.

    >>> from densenet_efficient.models.config import densenet_bc_config
    >>> plain = simulate(densenet_bc_config(16), "efficient", image_size=32)
    >>> synced = simulate(densenet_bc_config(16), "efficient", image_size=32, sync_bn_world_size=8)
    >>> synced.peak(64) > plain.peak(64), synced.gathers
    (True, 15)
    """
    world = check_sync_world(sync_bn_world_size)
    if not (isinstance(setting, str) and setting in (TORCHVISION, TORCHVISION_EFFICIENT)):
        setting = resolve_memory_plan(setting, config)
    with _LOCK, _no_collection():
        collectives = simulated_collectives(world) if world > 1 else contextlib.nullcontext()
        with collectives as group:
            sim = _simulate(
                config, setting, image_size, dtype, amp, optimizer, channels_last, device, regime, world,
                drop_rate, freeze_features,
            )  # fmt: skip
    return sim if group is None else replace(sim, gathers=group.gathers, all_reduces=group.all_reduces)


def _simulate(
    config: ArchConfig, setting: MemoryPlan | str, image_size: int, dtype: str, amp: str | None,
    optimizer: str, channels_last: bool, device: str, regime: int, world: int, drop_rate: float,
    frozen: bool,
) -> Simulation:  # fmt: skip
    tv = setting if isinstance(setting, str) else None
    model = _phantom_model(config, tv, dtype, channels_last, world > 1, drop_rate)
    if tv is None:
        model.set_memory_efficient(setting)
    batch = simulation_batch(config, image_size, world)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    shape = (batch, config.in_chans, image_size, image_size)
    x = phantom(torch.empty(shape, dtype=_DTYPES[dtype], device="meta").contiguous(memory_format=fmt))
    y = phantom(torch.zeros(batch, dtype=torch.long, device="meta"))
    scratch = functools.partial(cpu_scratch, batch=regime) if device == "cpu" else None
    live = LiveBytes(batch, CUDA_BLOCK if device == "cuda" else 1, scratch, SHORTCUT, phantom=True)
    try:
        opt, stamps = run_step(
            model, x, y, live, amp, optimizer, foreach=device == "cuda", segments=tv is None and not frozen,
            frozen=frozen,
        )  # fmt: skip
        inputs = Line(0, (x.numel() * x.element_size() + y.numel() * y.element_size()) // batch)
        return _summarise(live, stamps, model, opt, inputs)
    finally:  # the cached model goes back as it was, whatever the step raised
        for p in model.parameters():
            p.grad = None


def run_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, live: LiveBytes, amp: str | None, optimizer: str,
    foreach: bool = False, segments: bool = True, frozen: bool = False,
) -> tuple[Any, dict[str, int]]:  # fmt: skip
    """The steady training step the simulation counts, on ``model``'s tensors (phantom ones, or
    real ones: tests compare the two): the gradients made, one optimizer step for its state, then
    forward, cross-entropy, backward and the optimizer's step, under ``live``. Returns the
    optimizer and the stamps of its moments (``segments``: each block's and transition's too).
    ``frozen``: the features frozen as ``train --freeze-features`` freezes them (no gradient, batch
    norms in eval mode: backward stops at the classifier), for the step only."""
    if frozen:
        model.features.requires_grad_(False).eval()
    try:
        return _run_step(model, x, y, live, amp, optimizer, foreach, segments)
    finally:
        if frozen:
            model.features.requires_grad_(True).train()


def _run_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, live: LiveBytes, amp: str | None, optimizer: str,
    foreach: bool, segments: bool,
) -> tuple[Any, dict[str, int]]:  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    with PhantomMode(live.factories, live.kernel):  # not counted: the state a step starts from
        for p in params:
            p.grad = _zeros_like(p)
        opt = None if optimizer == "none" else _Optimizer(optimizer, params, foreach)
    for t in (*model.parameters(), *model.buffers(), *(p.grad for p in params), x, y):
        live.track(t)
    amp_dtype = _AMP.get(amp or "")
    stamps: dict[str, int] = {}
    with live:
        stamps["params"] = live.mark()
        if opt is not None:  # the state the steady step runs with
            opt.step()
        stamps["state"] = live.mark()
        hooks = _segment_hooks(model, live, stamps) if segments else []
        try:
            with reference_engine(), torch.autocast("cpu", dtype=amp_dtype, enabled=amp_dtype is not None):
                stamps["forward"] = live.mark()
                logits = model(x)
                stamps["head"] = stamps.get("head", stamps["forward"])
                loss = F.cross_entropy(logits, y)
            del logits
            stamps["loss"] = live.mark()
            loss.backward()
            del loss
            stamps["backward"] = live.mark()
            if opt is not None:
                opt.step()
            stamps["end"] = live.mark()
        finally:  # a step that raised leaves no hook on the (cached) model
            for h in hooks:
                h.remove()
    return opt, stamps


def _zeros_like(p: torch.Tensor) -> torch.Tensor:
    """``torch.zeros_like(p)`` for a dense ``p`` (a parameter: the same strides), through ATen's
    own kernels (``zeros_like``'s meta kernel is Python: 0.2 s of imports on its first call)."""
    return torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device=p.device).zero_()


class _Optimizer:
    """The optimizer's step as torch's own ``SGD``/``Adam``/``AdamW`` run it: their functional form
    (:func:`torch.optim.sgd.sgd`, :func:`torch.optim.adam.adam`), which their ``step`` calls, with
    the state their first step makes (the classes themselves import torch's compiler stack when
    made). ``foreach``: as torch defaults on CUDA (a few kernels over every parameter, whose
    temporaries, such as Adam's square roots, are alive for all parameters at once); on CPU a loop
    over the parameters (phantom tensors would otherwise always take the loop)."""

    def __init__(self, name: str, params: list[torch.Tensor], foreach: bool) -> None:
        self.name, self.params, self.foreach = name, params, foreach
        self.state: list[list[Any]] = []

    @torch.no_grad()
    def step(self) -> None:
        params, grads, n = self.params, [p.grad for p in self.params], len(self.params)
        if self.name in ("sgd", "momentum"):
            if not self.state:
                self.state = [[None] * n]  # the momentum buffers, made by the first step
            sgd(
                params, grads, self.state[0], foreach=self.foreach, weight_decay=0.0,
                momentum=0.9 if self.name == "momentum" else 0.0, lr=1e-3, dampening=0.0,
                nesterov=False, maximize=False,
            )  # fmt: skip
            return
        if not self.state:  # as Adam's first step makes them
            self.state = [
                [torch.tensor(0.0) for _ in params],
                [_zeros_like(p) for p in params],
                [_zeros_like(p) for p in params],
            ]
        steps, exp_avgs, exp_avg_sqs = self.state
        adamw = self.name == "adamw"
        adam(
            params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=self.foreach,
            decoupled_weight_decay=adamw, amsgrad=False, beta1=0.9, beta2=0.999, lr=1e-3,
            weight_decay=1e-2 if adamw else 0.0, eps=1e-8, maximize=False,
        )  # fmt: skip

    def state_bytes(self) -> int:
        """Bytes of the state tensors (not the step counts)."""
        return sum(t.numel() * t.element_size() for ts in self.state for t in ts if t is not None and t.dim())


def _segment_hooks(model: nn.Module, live: LiveBytes, stamps: dict[str, int]) -> list[Any]:
    """Stamp each dense block's and transition's forward start and its backward's start and end
    (gradient hooks on its output and its input)."""
    handles = []
    for name, module in model.features.named_children():
        if not name.startswith(("denseblock", "transition")):  # torchvision's names, the model's too
            continue

        def pre(mod: nn.Module, args: tuple, name: str = name) -> None:
            stamps[f"{name}.forward"] = live.mark()
            x = args[0]
            if x.requires_grad:
                x.register_hook(lambda g, name=name: _stamp(stamps, f"{name}.backward_end", live))

        def post(mod: nn.Module, args: tuple, out: torch.Tensor, name: str = name) -> None:
            stamps[f"{name}.forward_end"] = live.mark()
            stamps["head"] = live.mark()  # overwritten by each later segment: the last one's end
            if out.requires_grad:
                out.register_hook(lambda g, name=name: _stamp(stamps, f"{name}.backward", live))

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def _stamp(stamps: dict[str, int], key: str, live: LiveBytes) -> None:
    stamps[key] = live.mark()


def _summarise(
    live: LiveBytes, stamps: dict[str, int], model: nn.Module, opt: Any, inputs: Line
) -> Simulation:
    line, hull = live.line, live.hull
    params = list(model.parameters())
    n_param = sum(p.numel() * p.element_size() for p in params)
    n_grad = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    state = opt.state_bytes() if opt is not None else 0
    start = line(stamps["forward"])
    names = [k.removesuffix(".forward") for k in stamps if k.endswith(".forward")]
    segments = []
    for i, name in enumerate(names):
        o = line(stamps[f"{name}.forward"])
        last = i == len(names) - 1
        end = line(stamps[f"{name}.forward_end"] if last else stamps[f"{names[i + 1]}.forward"])
        segments.append(
            Segment(
                name,
                kept=end - o,
                forward=hull(stamps[f"{name}.forward"], stamps[f"{name}.forward_end"], o),
                backward=hull(stamps[f"{name}.backward"], stamps[f"{name}.backward_end"], o),
            )
        )
    if names:
        first, last = names[0], names[-1]
        stem = hull(stamps["forward"], stamps[f"{first}.forward"], start) + hull(
            stamps[f"{first}.backward_end"], stamps["backward"], start
        )
        head_base = line(stamps[f"{last}.forward_end"])
        head = hull(stamps[f"{last}.forward_end"], stamps[f"{last}.backward"], head_base)
        stem_kept = line(stamps[f"{first}.forward"]) - start
    else:
        stem, head, stem_kept = (), (), ZERO
    return Simulation(
        persistent=start,
        parameters=n_param,
        gradients=n_grad,
        optimizer_state=state,
        inputs=inputs,
        activations=line(stamps["loss"]) - start,
        trace=hull(0, len(live.trace) - 1),
        segments=tuple(segments),
        stem=upper_hull(list(stem)),
        stem_kept=stem_kept,
        head=head,
        optimizer=hull(stamps["backward"], stamps["end"]) + hull(stamps["params"], stamps["state"]),
    )
