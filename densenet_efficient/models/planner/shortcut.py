"""Outputs of ops on phantom tensors (:mod:`.phantom`) without torch's Python meta kernels.

Many ops' meta kernels are Python decompositions: batch norm's forward and backward, ReLU's
backward, the loss, ``stack``, ``cat``, most elementwise ops. They cost 1-10 ms a call against
0.01-0.1 ms for ATen's own, and the first one imports torch's compiler stack (about a second).
Others are torch's Python meta functions (the pooling layers, ``mm``), whose first call imports
sympy (0.2 s); ``batch_norm_update_stats`` has none at all, and a foreach op's composite loops over
Python ones. The simulation (:class:`~.simulate.LiveBytes`)
counts only the storages an op returns, so :class:`Shortcut` makes those outputs from the op's
own kernel run on small real CPU tensors, once per pattern:

* batch norm, ReLU's backward and ``add`` on maps (:data:`SLOW`) return tensors shaped like their
  input map, one value per channel, empty tensors or the ``out=`` tensors they were given: the op
  runs once per pattern (the op, its arguments' dtypes, memory formats and settings, each setting
  with its type) on a small map, and every later call of the pattern gets fresh tensors of the real
  sizes of the kinds it returned. An output of any other kind (an input returned, a resized
  ``out=``) makes the pattern fall back, and so does a map with a dimension of size 1 (its memory
  format ambiguous and that dimension's stride free: the op keeps a dense input's strides or
  orders its output by its inputs', which the small call cannot show);
* every other op with a Python meta kernel (or none) runs once per pattern (the op, its
  arguments' shapes, strides and dtypes, every other argument with its type) on real tensors of
  the same shapes with the batch replaced by 2 and then by 7: a dimension of its outputs that is 2
  and then 7 is the batch, one that stays is not, and anything else (a view of an input, an input
  reshaped or resized in place, strides that change with the batch, an op whose outputs depend on
  its inputs' values) falls back to the op's own kernel;
* ``slice`` is the ``as_strided`` view torch's own decomposition makes, without the
  decomposition, and ``cat`` of maps along their channels (the naive engine's, a pattern per
  layer) the map of their shared format that ATen's ``cat`` makes. (In-place ops that change only
  values never get here: :func:`.phantom.values_only`.)

Besides those two, nothing about the ops is written here. tests/models/test_planner.py holds a
simulated step equal, op by op, to the same step on real tensors.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .phantom import _META, leaves, per_op, tree_map

__all__ = ["Shortcut"]

_aten = torch.ops.aten

#: The ops on maps learnt from one small call: those whose meta kernel decomposes in Python.
SLOW = frozenset(
    {
        _aten.native_batch_norm.default,
        _aten.native_batch_norm.out,
        _aten.native_batch_norm_backward.default,
        _aten._batch_norm_with_update.default,
        _aten.batch_norm_backward.default,
        _aten.threshold_backward.grad_input,
        _aten.threshold_backward.default,
        _aten.batch_norm_update_stats.default,  # no meta kernel at all
        _aten.add.Tensor,  # naive backward: each feature map's gradient summed from later layers
    }
)

#: The small input the pattern is learnt on (distinct sizes: a stride tells its memory format).
_PROXY = (2, 3, 5, 7)


#: An argument the shortcut does not handle.
_OTHER = object()


def _map_format(t: torch.Tensor) -> torch.memory_format | None:
    """The memory format of a map with no dimension of 1 whose strides fall in that format's order
    (dense, or a slice of a dense map along any dimension: what the engine passes), read from its
    strides (torch's ``suggest_memory_format`` reads them with symbolic sizes in mind, importing
    sympy on its first call: 0.2 s); None for any
    other (expanded, transposed: the op's output would keep its own stride order, which the small
    call cannot show). Channels last also needs each stride to span the dimensions inside it (as
    torch's ``suggest_memory_format`` reads it): every other channel of 5, or column of 8, leaves
    them interleaved, and ops that make their output in the suggested format (batch norm) make
    it contiguous."""
    n, c, h, w = t.stride()
    if c < w:
        _, channels, rows, columns = t.shape
        fits = n >= h * rows and h >= w * columns and w >= c * channels
        return torch.channels_last if fits and c > 0 else None
    return torch.contiguous_format if n >= c >= h >= w > 0 else None


def _dev(a: torch.Tensor) -> Any:
    return "cpu" if a.is_meta else a.device


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _valueless(t: Any) -> bool:
    """A tensor without values (the meta tensor a phantom holds): an op that only writes values
    into it changes nothing the simulation sees. Real tensors (an optimizer's step count) run."""
    return isinstance(t, torch.Tensor) and t.is_meta


def _slice(x: torch.Tensor, dim: int = 0, start: int | None = None, end: int | None = None, step: int = 1) -> Any:
    """``x.slice(dim, start, end, step)`` as the view ATen makes (its bounds clamped as
    ``at::slice`` clamps them), through one ``as_strided``: a meta ``slice`` takes a Python
    decomposition and then that same ``as_strided``, about twice the time."""
    if step <= 0 or not -x.dim() <= dim < x.dim():
        return NotImplemented  # the op says why (a 0-dim tensor, a dimension out of range)
    dim = dim % x.dim()
    size = x.shape[dim]
    start = 0 if start is None else start + size if start < 0 else start
    end = size if end is None else end + size if end < 0 else end
    start = min(max(start, 0), size)
    end = min(max(end, start), size)
    sizes, strides = list(x.shape), list(x.stride())
    sizes[dim] = (end - start + step - 1) // step
    offset = x.storage_offset() + start * strides[dim]
    strides[dim] *= step
    return x.as_strided(sizes, strides, offset)


def _cat(tensors: list, dim: int = 0) -> Any:
    """``torch.cat(tensors, 1)`` of maps that differ only in their channels, each dense in one
    memory format (the naive engine's concatenated features): a map of that format with the
    channels summed, as ATen's ``cat`` makes it (its output takes the format its inputs share).
    Anything else (another dimension, mixed formats or dtypes, a size of 1 or 0 that leaves a
    format ambiguous: ATen makes an empty one contiguous) returns NotImplemented: the op is read off small calls. One call per layer of a
    naive step, each with its own channel counts: small calls would cost densenet201 a quarter of
    a second of real concatenations."""
    if dim not in (1, -3) or not tensors or tensors[0].dim() != 4:
        return NotImplemented
    head = tensors[0]
    n, _, h, w = head.shape
    for t in tensors:
        if t.dim() != 4 or t.dtype != head.dtype or min(t.shape) < 2 or (t.shape[0], *t.shape[2:]) != (n, h, w):
            return NotImplemented
    fmt = _map_format(head)
    if fmt is None or not all(t.is_contiguous(memory_format=fmt) for t in tensors):
        return NotImplemented
    channels = sum(t.shape[1] for t in tensors)
    return torch.empty((n, channels, h, w), dtype=head.dtype, device=_META, memory_format=fmt)


class Shortcut:
    """``shortcut(func, args, kwargs, batch)``: the outputs of ``func`` on meta tensors whose
    batch-sized dimensions are ``batch``, or ``NotImplemented`` when it must run itself."""

    def __init__(self) -> None:
        self.patterns: dict[Any, Any] = {}
        self.small: dict[Any, Any] = {}

    def __call__(self, func: Any, args: tuple, kwargs: dict, batch: int) -> Any:
        route = _route(func)
        if route is None:
            return NotImplemented
        if route == "slice":
            return _slice(*args, **kwargs) if _valueless(args[0]) else NotImplemented
        if route == "cat" and all(_valueless(t) for t in args[0]):
            out = _cat(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = self._maps(func, args, kwargs) if route == "maps" else NotImplemented
        return self._small(func, args, kwargs, batch) if out is NotImplemented else out

    def _maps(self, func: Any, args: tuple, kwargs: dict) -> Any:
        maps = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() == 4]
        if not maps or 1 in maps[0].shape or any(m.shape != maps[0].shape for m in maps):
            return NotImplemented
        shape = maps[0].shape
        described = [self._describe(a, shape[1]) for a in args]
        named = sorted((name, self._describe(a, shape[1])) for name, a in kwargs.items())
        if any(d is _OTHER for d in described) or any(d is _OTHER for _, d in named):
            return NotImplemented
        key = (func, *described, *named)
        if key not in self.patterns:
            self.patterns[key] = self._learn(func, args, kwargs, shape[1])
        pattern = self.patterns[key]
        if pattern is None:
            return NotImplemented
        single, specs = pattern
        outs = [self._make(spec, shape, kwargs, maps[0].device) for spec in specs]
        return outs[0] if single else tuple(outs)

    def _small(self, func: Any, args: tuple, kwargs: dict, batch: int) -> Any:
        """The op's outputs, as the op makes them on small real tensors: every dimension that is
        the batch (``batch``) replaced by a small stand-in (:data:`_STAND_INS`, in turn), the rest as they are."""
        key = _small_key(func, args, kwargs, batch)
        if key not in self.small:
            try:
                self.small[key] = _learn_small(func, args, kwargs, batch)
            except _Unfit:
                self.small[key] = None
        pattern = self.small[key]
        if pattern is None:
            return NotImplemented
        template, specs = pattern
        given = list(leaves((args, kwargs)))
        outs = []
        for spec in specs:
            if spec[0] == "in":
                outs.append(given[spec[1]])
            elif spec[0] == "value":
                outs.append(spec[1])
            else:
                shape = [batch if d < 0 else d for d in spec[1]]
                outs.append(torch.empty_strided(shape, spec[2], dtype=spec[3], device=_META))
        return tree_map(outs.__getitem__, template)

    @staticmethod
    def _describe(a: Any, channels: int) -> Any:
        """An argument as the pattern sees it (``_OTHER``: one this shortcut does not handle)."""
        if isinstance(a, (list, tuple)):
            return _OTHER if any(isinstance(x, torch.Tensor) for x in a) else tuple((type(x), x) for x in a)
        if not isinstance(a, torch.Tensor):
            return type(a), a  # 2 and 2.0 are one key of a dict, but an integer add refuses alpha=2.0
        if a.dim() == 4:  # one of the maps, none with a dimension of 1 (see _maps)
            fmt = _map_format(a)
            return _OTHER if fmt is None else ("map", a.dtype, fmt, a.device)
        if a.dim() == 1 and a.numel() == channels:
            return ("channel", a.dtype, a.device)
        if a.numel() == 0:
            return ("empty", a.dtype, tuple(a.shape), a.device)
        return _OTHER

    @staticmethod
    def _proxy(a: Any, channels: int) -> Any:
        if not isinstance(a, torch.Tensor):
            return a
        if a.dim() == 4:  # a map _describe read (its format is one)
            fmt = _map_format(a)
            return torch.empty(_PROXY, dtype=a.dtype, device=_dev(a)).contiguous(memory_format=fmt)
        if a.dim() == 1 and a.numel() == channels:
            return torch.empty(_PROXY[1], dtype=a.dtype, device=_dev(a))
        return torch.empty(a.shape, dtype=a.dtype, device=_dev(a))

    def _learn(self, func: Any, args: tuple, kwargs: dict, channels: int) -> Any:
        """Run ``func`` on small tensors of the same kinds; note each output's kind (None: an
        output this shortcut cannot make)."""
        pargs = [self._proxy(a, channels) for a in args]
        pkw = {name: self._proxy(a, channels) for name, a in kwargs.items()}
        before = {name: tuple(t.shape) for name, t in pkw.items() if isinstance(t, torch.Tensor)}
        try:
            out = func(*pargs, **pkw)
        except Exception:  # noqa: BLE001 (the small call is only a probe: the op will say why itself)
            return None
        single = isinstance(out, torch.Tensor)
        given = {_storage(t): name for name, t in pkw.items() if isinstance(t, torch.Tensor)}
        inputs = {_storage(t) for t in pargs if isinstance(t, torch.Tensor)}
        if any(tuple(pkw[name].shape) != shape for name, shape in before.items()):
            return None  # an out= tensor resized: not the engine's calls
        specs = []
        for o in [out] if single else out:
            if o is None:
                specs.append(None)
            elif _storage(o) in given:
                specs.append(("out", given[_storage(o)]))
            elif _storage(o) in inputs:
                return None  # an input returned (aliased): the op must run itself
            elif tuple(o.shape) == _PROXY:
                fmt = _map_format(o)
                if fmt is None:
                    return None  # laid out in no format the pattern can make again
                specs.append(("map", o.dtype, o.device, fmt))
            elif tuple(o.shape) == (_PROXY[1],):
                specs.append(("channel", o.dtype, o.device))
            elif o.numel() == 0:
                specs.append(("empty", o.dtype, o.device, tuple(o.shape)))
            else:
                return None
        return single, specs

    @staticmethod
    def _make(spec: Any, shape: torch.Size, kwargs: dict, device: Any) -> Any:
        if spec is None:
            return None
        kind = spec[0]
        if kind == "out":
            return kwargs[spec[1]]
        if kind == "map":
            return torch.empty(shape, dtype=spec[1], device=device, memory_format=spec[3])
        if kind == "channel":
            return torch.empty(shape[1], dtype=spec[1], device=device)
        return torch.empty(spec[3], dtype=spec[1], device=device)


@per_op
def _route(func: Any) -> str | None:
    """Which way :class:`Shortcut` answers ``func``: ``"slice"``, ``"cat"``, ``"maps"`` (:data:`SLOW`),
    ``"small"`` (a Python or missing meta kernel), or None (ATen's own meta kernel runs)."""
    if func is _aten.slice.Tensor:
        return "slice"
    if func is _aten.cat.default:
        return "cat"
    if func in SLOW:
        return "maps"
    if "linalg" in func.name():
        # a factorisation's sizes are min(rows, columns) of a matrix: with the batch as its rows,
        # 2 and then 7 at the small calls (below the columns), which read as the batch
        return None
    return "small" if _python_meta(func) else None


def _python_meta(func: Any) -> bool:
    """Whether ``func``'s meta kernel, as torch's dispatcher lists it, is Python (a decomposition
    through torch's reference ops, or one of its meta functions: slow, and the first of them
    imports sympy, 0.2 s, or torch's compiler, a second), missing, or a foreach op's composite (a
    loop over the per-tensor op, whose meta kernel is Python); False for ATen's own or another
    composite of other ops (C++ views and copies)."""
    lines = torch._C._dispatch_dump(func.name()).splitlines()
    line = next((ln for ln in lines if ln.startswith("Meta:")), None)
    if line is None:
        composite = any(ln.startswith("CompositeExplicitAutograd") for ln in lines)
        return not composite or func.name().startswith("aten::_foreach_")
    return "_meta_registrations.py" in line


#: Batch sizes the small calls stand in for the simulation's: two, so that a dimension that is
#: the batch is told from one that only equals it, and far apart, so that a size that follows the
#: batch an op runs along (a real FFT's ``batch // 2 + 1``, a pool's windows) differs between
#: them instead of reading as a fixed one (at 2 and 3, the FFT's is 2 at both, a 2-wide pool's 1);
#: a size that steps every 6 or more images still can.
_STAND_INS = (2, 7)


class _Unfit(Exception):
    """A call :meth:`Shortcut._small` cannot stand in for: the op runs its own kernel."""


def _small_key(func: Any, args: Any, kwargs: Any, batch: int) -> Any:
    """The call as its arguments describe it, each in its place (a list as a tuple of its items,
    a keyword with its name: ``[3, 3], [2]`` is not ``[3], [3, 2]``, ``right=`` not ``out_int32=``)."""

    def desc(a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            shape = tuple(-1 if d == batch else d for d in a.shape)
            return ("t", shape, a.stride(), a.dtype)
        if type(a) in (tuple, list):
            return ("list", tuple(desc(v) for v in a))
        return type(a), a

    return func, desc(args), tuple((name, desc(v)) for name, v in kwargs.items())


#: The most bytes the real tensors of one small call may hold: a call that would need more (maps of
#: a huge image or width) is left to the op's own meta kernel, which allocates nothing. The largest
#: small calls of torchvision's DenseNets at 224 px hold about 110 MiB (densenet161's foreach Adam
#: ``_foreach_sqrt``; max-pooling's backward 97 MiB): images up to about 700 px keep the shortcut.
SMALL_CALL_BYTES = 1 << 30


def _stand_in(a: torch.Tensor, batch: int, stand_in: int) -> list[int]:
    """``a``'s sizes with ``stand_in`` for every batch-sized dimension (which must be its outermost:
    its other strides then do not depend on the batch)."""
    sizes, strides = list(a.shape), a.stride()
    for i, d in enumerate(sizes):
        if d == batch:
            inner = max((st * n for j, (st, n) in enumerate(zip(strides, sizes, strict=True)) if j != i and n > 1), default=0)
            if strides[i] < inner:
                raise _Unfit
            sizes[i] = stand_in
    return sizes


def _extent(sizes: list[int], strides: tuple[int, ...], itemsize: int) -> int:
    """Bytes a tensor of these sizes and strides holds: the storage it spans, or its elements
    when there are more of them (a broadcast input, whose output an op makes at its full size)."""
    if 0 in sizes:
        return 0
    spanned = 1 + sum((n - 1) * st for n, st in zip(sizes, strides, strict=True))
    return max(spanned, math.prod(sizes)) * itemsize


def _real(a: Any, batch: int, stand_in: int) -> Any:
    """A CPU tensor of zeros like ``a`` with ``stand_in`` for every batch-sized dimension."""
    if not isinstance(a, torch.Tensor):
        return a
    t = torch.empty_strided(_stand_in(a, batch, stand_in), a.stride(), dtype=a.dtype)
    return t.zero_()  # zeros: valid indices, and no garbage denormals (a garbage mm runs 8x slower)


def _layout(a: Any) -> Any:
    """A tensor's sizes, strides, offset and storage size (what an op may change in place)."""
    if not isinstance(a, torch.Tensor):
        return None
    return a.shape, a.stride(), a.storage_offset(), a.untyped_storage().nbytes()


#: Ops whose outputs' values or shapes depend on their inputs' values (``item``, ``nonzero``, a
#: boolean index), as torch tags them: the small calls' zeros and garbage cannot stand for those.
_VALUED = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)


def _learn_small(func: Any, args: tuple, kwargs: dict, batch: int) -> Any:
    if any(tag in _VALUED for tag in func.tags):
        raise _Unfit  # the meta kernel answers (or refuses, with no values to read)
    runs = []
    tensors = [a for a in leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
    batched = any(batch in a.shape for a in tensors)
    largest = _STAND_INS[-1] if batched else _STAND_INS[0]
    need = sum(_extent(_stand_in(a, batch, largest), a.stride(), a.element_size()) for a in tensors)
    if need > SMALL_CALL_BYTES:
        raise _Unfit  # the meta kernel answers, allocating nothing
    # without a batch-sized argument both calls would be the same call (an optimizer's foreach op
    # on every parameter: a call costs the model's size): one is made
    for stand_in in _STAND_INS if batched else _STAND_INS[:1]:
        pargs, pkwargs = tree_map(lambda a, s=stand_in: _real(a, batch, s), (args, kwargs))
        before = [_layout(a) for a in leaves((pargs, pkwargs))]
        try:
            out = func(*pargs, **pkwargs)
        except Exception as err:  # noqa: BLE001 (the op on its own tensors will say why)
            raise _Unfit from err
        if [_layout(a) for a in leaves((pargs, pkwargs))] != before:
            raise _Unfit  # an input reshaped or resized (unsqueeze_, a resized out=): the op does it
        runs.append((list(leaves((pargs, pkwargs))), list(leaves(out)), out))
    (real, first, out), (_, second, _) = runs if batched else runs * 2
    if len(first) != len(second):
        raise _Unfit
    counter = iter(range(len(first)))
    template = tree_map(lambda _: next(counter), out)
    specs: list[Any] = []
    given = {id(r): i for i, r in reversed(list(enumerate(real)))}  # an input's first place
    storages = {_storage(r) for r in real if isinstance(r, torch.Tensor)}
    for a, b in zip(first, second, strict=True):
        if not isinstance(a, torch.Tensor):
            if a != b:
                raise _Unfit
            specs.append(("value", a))
            continue
        if id(a) in given:
            specs.append(("in", given[id(a)]))
            continue
        if _storage(a) in storages:
            raise _Unfit  # a view of an input
        if a.stride() != b.stride() or a.dtype != b.dtype or a.dim() != b.dim():
            raise _Unfit
        shape = []
        for d1, d2 in zip(a.shape, b.shape, strict=True):
            if (d1, d2) == _STAND_INS:
                shape.append(-1)
            elif d1 == d2:
                shape.append(d1)
            else:
                raise _Unfit
        specs.append(("new", tuple(shape), a.stride(), a.dtype))
    return template, specs
