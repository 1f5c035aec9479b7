"""Phantom tensors: tensors that say they are on a device (CPU) and hold no data.

A :class:`Phantom` wraps a ``meta`` tensor: its shape, dtype, strides and a storage of the right
size, no values. To the code that runs on it (the model, the engine, autocast, autograd, the
optimizer) it is a tensor of its device; every op on it runs the op's meta kernel on the
wrapped tensors (:func:`run`) and wraps what comes out, so the step's own ops make every tensor
it would make, at no cost but the call. Torch's ``FakeTensorMode`` does the same with more
generality (symbolic shapes, dynamic outputs, caching); it also imports torch's compiler stack
when first made (about a second), which a planner answering in under one cannot pay.

Ops on ordinary tensors alone run as they are (an optimizer's step count stays a real number);
an ordinary tensor beside a phantom one is read as a meta tensor, and an op that would write
into it (in-place, ``out=``) refuses: it cannot hold what phantom tensors compute.

Phantom tensors are worked on under a :class:`PhantomMode` (or a mode built on it): torch asks a
tensor subclass that handles its own ops whether it is a distributed tensor first, which imports
``torch.distributed.tensor`` (0.4 s, sympy most of it) at the first op of a process; under a
dispatch mode the mode answers and that question is never asked.

>>> with PhantomMode():
...     x = phantom(torch.empty(2, 3, device="meta"))
...     y = (x * 2).sum(0)
>>> type(y).__name__, y.device.type, tuple(y.shape)
('Phantom', 'cpu', (3,))
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Phantom", "PhantomMode", "first", "leaves", "only_values", "per_op", "phantom", "run", "tree_map", "values_only"]

_META = torch.device("meta")
_aten = torch.ops.aten


def per_op(fn: Any) -> Any:
    """``functools.cache`` for a function of an op, keyed by the op's identity: an ``OpOverload``
    hashes in Python, a call per lookup, and a simulation looks ops up several times per op. The
    ops looked up are kept alive (``seen``): an op of a library that is gone (a scoped
    ``torch.library``) would otherwise be freed and its identity taken by another op."""
    memo: dict[int, Any] = {}
    seen: list[Any] = []

    @functools.wraps(fn)
    def cached(func: Any) -> Any:
        try:
            return memo[id(func)]
        except KeyError:
            memo[id(func)] = value = fn(func)
            seen.append(func)
            return value

    return cached


#: The two in-place ops among ATen's 200-odd of this form that change a tensor's size or storage
#: but are not tagged ``inplace_view`` (listed from every ATen op in torch 2.14).
_UNTAGGED_RESIZES = frozenset({"aten::_resize_output_", "aten::shallow_copy_data_"})


@per_op
def values_only(func: Any) -> bool:
    """Whether ``func`` writes only the values of its first argument (``Tensor(a!) self``, or a
    list of them), never its size, strides or storage (the ops that change those, ``resize_``,
    ``set_``, ``unsqueeze_``, ``as_strided_``, torch tags ``inplace_view``), and no other argument.
    On a phantom tensor, which holds no values, such an op returns its first argument as it is,
    without running (4 ops in 10 of a training step: the gradient sums of a block's backward, the
    optimizer's updates, the engine's ReLUs and copies). The checks such an op makes of its
    arguments, broadcasting and casting, are skipped with it: the simulation runs the code the
    step runs for real, not a test of it."""
    schema = func._schema
    written = [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    if torch.Tag.inplace_view in func.tags or func.name() in _UNTAGGED_RESIZES:
        return False
    if not written or written[0] is not schema.arguments[0]:
        return False
    returns = schema.returns
    return len(written) == 1 and (not returns or (len(returns) == 1 and returns[0].alias_info is not None))


def only_values(func: Any, args: tuple) -> bool:
    """Whether ``func(*args)`` writes only values into phantom tensors (:func:`values_only`, its
    first argument phantom): it changes nothing, and returns :func:`first`."""
    if not args or not values_only(func):
        return False
    x = args[0]
    if type(x) in (list, tuple):
        return bool(x) and all(type(t) is Phantom for t in x)
    return type(x) is Phantom


def first(func: Any, args: tuple) -> Any:
    """What an op that writes its first argument in place returns: that argument, or nothing."""
    return args[0] if func._schema.returns else None


class Phantom(torch.Tensor):
    """A tensor on ``device`` that holds ``elem``, a meta tensor of the same shape and strides."""

    elem: torch.Tensor
    __slots__ = ("elem",)
    # no Python-level (torch function) handling: every op reaches __torch_dispatch__ as ATen ops
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, elem: torch.Tensor, device: torch.device) -> Phantom:
        r = torch.Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(),
            dtype=elem.dtype, layout=elem.layout, device=device, requires_grad=elem.requires_grad,
        )  # fmt: skip
        r.elem = elem
        return r

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        # outside a PhantomMode (see the module's docstring): correct, at the cost of that import
        return run(func, args, kwargs or {})

    def __repr__(self) -> str:
        return f"Phantom({tuple(self.shape)}, dtype={self.dtype}, device={self.device})"


class PhantomMode(TorchDispatchMode):
    """Within, every op runs through :func:`run` (``kernel`` and ``factories``: as there)."""

    def __init__(self, factories: bool = True, kernel: Any = None) -> None:
        super().__init__()
        self.factories, self.kernel = factories, kernel

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps a mode's __torch_dispatch__ so that its compiler never traces it, which
        # imports the compiler (a second) at the first op; nothing compiles phantom tensors
        return False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return run(func, args, kwargs or {}, self.kernel, self.factories)


def phantom(t: torch.Tensor, device: torch.device | str = "cpu") -> Phantom:
    """``t`` (a meta tensor) as a phantom one on ``device``."""
    return Phantom(t, torch.device(device))


def run(func: Any, args: tuple, kwargs: dict, kernel: Any = None, factories: bool = True) -> Any:
    """``func(*args, **kwargs)`` with phantom tensors: the op on their meta tensors (through
    ``kernel(func, args, kwargs)`` when given: NotImplemented there runs the op), its outputs
    wrapped; an op's output that is one of its inputs (in-place, ``out=``) is that input.
    ``factories``: whether an op that makes a tensor from no tensor makes a phantom one (False:
    a real one, as in a step on real tensors)."""
    if only_values(func, args):
        return first(func, args)
    found: list[Phantom] = []
    real: list[torch.Tensor] = []
    margs = _unwrap(args, found, real)
    mkwargs = {k: _unwrap(v, found, real) for k, v in kwargs.items()} if kwargs else {}
    if not found:
        # ordinary tensors only, none made, or a factory of a real step: the op runs as it is
        if real or not factories or not _makes(func):
            return func(*args, **kwargs)
        # a factory: made on the meta device, said to be on the one asked for
        device = torch.device(mkwargs.get("device") or "cpu")
        mkwargs["device"] = _META
    else:
        device = found[0].device
        if real and _writes(func, real, args, kwargs):
            raise RuntimeError(f"{func}: writes what phantom tensors compute into a real tensor, which cannot hold it")
        if real or "device" in mkwargs:
            if mkwargs.get("device") is not None:
                device = torch.device(mkwargs["device"])
                mkwargs["device"] = _META
            margs, mkwargs = tree_map(_to_meta, margs), tree_map(_to_meta, mkwargs)
    rule = _rule(func)
    out = NotImplemented if rule is None else rule(*args, **kwargs)
    if out is NotImplemented and kernel is not None:
        out = kernel(func, margs, mkwargs)
    if out is NotImplemented:
        out = func(*margs, **mkwargs)
    if isinstance(out, torch.Tensor):
        for p in found:
            if p.elem is out:  # in place, or out=: the input that holds it
                return p
        return Phantom(out, device)
    held = {id(p.elem): p for p in found}  # a foreach op's outputs: as many as its inputs

    def wrap(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        p = held.get(id(t))
        return Phantom(t, device) if p is None else p

    return tree_map(wrap, out)


def _unwrap(t: Any, found: list[Phantom], real: list[torch.Tensor]) -> Any:
    """``t`` with its phantom tensors' meta tensors in their place (noted in ``found``; ordinary
    tensors in ``real``). A module function: a nested one calling itself would be a reference
    cycle holding the op's tensors until the garbage collector runs, not until the op returns."""
    kind = type(t)
    if kind is Phantom:
        found.append(t)
        return t.elem
    if kind is tuple or kind is list:
        out = []
        for v in t:  # a loop, not a generator: this runs for every argument of every op
            k = type(v)
            if k is Phantom:
                found.append(v)
                out.append(v.elem)
            elif k is tuple or k is list or isinstance(v, torch.Tensor):
                out.append(_unwrap(v, found, real))
            else:
                out.append(v)
        return out if kind is list else tuple(out)
    if isinstance(t, torch.Tensor):
        real.append(t)
    return t


def tree_map(fn: Any, x: Any) -> Any:
    """``fn`` on every leaf of the tuples, lists and dicts an op's arguments and outputs are made
    of (torch's ``pytree.tree_map`` handles any registered container, at several times the cost
    per op: a third of a simulation's time when it was used here)."""
    if type(x) in (tuple, list):
        return type(x)(tree_map(fn, v) for v in x)
    if type(x) is dict:
        return {k: tree_map(fn, v) for k, v in x.items()}
    return fn(x)


def leaves(x: Any) -> Iterator[Any]:
    """The leaves :func:`tree_map` visits, in its order."""
    if type(x) in (tuple, list):
        for v in x:
            yield from leaves(v)
    elif type(x) is dict:
        for v in x.values():
            yield from leaves(v)
    else:
        yield x


@per_op
def _makes(func: Any) -> bool:
    """Whether ``func`` takes a device: a factory (``empty``, ``zeros``, ``scalar_tensor``)."""
    return any(a.name == "device" for a in func._schema.arguments)


def _writes(func: Any, real: list[torch.Tensor], args: tuple, kwargs: dict) -> bool:
    """Whether ``func`` writes into one of the ``real`` tensors among its arguments (in-place, ``out=``)."""
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            value = kwargs.get(a.name) if a.kwarg_only or i >= len(args) else args[i]
            if any(t is r for t in leaves(value) for r in real):
                return True
    return False


def _to_meta(t: Any) -> Any:
    return t.to(_META) if isinstance(t, torch.Tensor) and not t.is_meta else t


def _conv_format(x: torch.Tensor, w: torch.Tensor, bias: Any, bias_sizes: Any, conv: tuple) -> torch.memory_format:
    """The memory format ATen's convolution gives its outputs on the phantom tensors' device: the
    backend it would pick for them, and that backend's format (the meta kernel, which has no
    device, leaves every output contiguous; torch's fake tensors ask the same two functions)."""
    stride, padding, dilation, transposed, output_padding, groups = conv
    backend = torch._C._select_conv_backend(
        x, w, bias=bias, stride=stride, padding=padding, dilation=dilation, transposed=transposed,
        output_padding=output_padding, groups=groups, bias_sizes=bias_sizes,
    )  # fmt: skip
    return torch._C._conv_determine_backend_memory_format(x, w, backend)


def _convolution(x: torch.Tensor, w: torch.Tensor, bias: Any, *conv: Any) -> Any:
    """``aten.convolution`` on phantom tensors: its output's size (``nn.Conv2d``'s formula) in the
    backend's memory format. Transposed or non-2D convolutions take the meta kernel."""
    stride, padding, dilation, transposed = conv[:4]
    if transposed or x.dim() != 4:
        return NotImplemented
    size = [x.shape[0], w.shape[0]]
    for d in range(2):
        size.append((x.shape[2 + d] + 2 * padding[d] - dilation[d] * (w.shape[2 + d] - 1) - 1) // stride[d] + 1)
    fmt = _conv_format(x, w, bias, None, conv)
    return torch.empty(size, dtype=x.dtype, device=_META, memory_format=fmt)


def _convolution_backward(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias_sizes: Any, *rest: Any) -> Any:
    """``aten.convolution_backward`` on phantom tensors: the gradients asked for (``rest[-1]``),
    shaped like the input, the weight and the bias, the first two in the backend's format."""
    *conv, mask = rest
    if conv[3] or x.dim() != 4:
        return NotImplemented
    fmt = _conv_format(x, w, None, bias_sizes, tuple(conv))
    return (
        torch.empty(x.shape, dtype=g.dtype, device=_META, memory_format=fmt) if mask[0] else None,
        torch.empty(w.shape, dtype=g.dtype, device=_META, memory_format=fmt) if mask[1] else None,
        torch.empty(bias_sizes, dtype=g.dtype, device=_META) if mask[2] else None,
    )


#: Ops whose meta kernel cannot give what they make on a device: made here, from the phantom
#: tensors themselves.
_RULES = {_aten.convolution.default: _convolution, _aten.convolution_backward.default: _convolution_backward}


@per_op
def _rule(func: Any) -> Any:
    return _RULES.get(func)
