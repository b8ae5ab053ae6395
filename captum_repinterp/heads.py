"""The head ``G: psi -> logits``: the part of the network after the split layer.

Either given by the user (``head(layer_output) -> logits``, wrapped by :class:`UserHead`)
or derived from the model (:class:`HookHead`): the model is run on the seed's input with
the layer's output replaced, through a forward hook, by the points where the head is
evaluated. Both take ``B x D`` features and return ``B x C`` logits.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .features import LayerLayout, flatten_logits, forward_with_layer
from .inputs import expand_args

__all__ = ["HookHead", "UserHead", "make_head", "record_trunk", "trunk_decided"]


class _Recording:
    """Context that records every module call of ``root`` (start, end and detached
    output, in call order): what :class:`_Trunk` keeps from a run."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.events: list[tuple[bool, nn.Module, object]] = []  # (is_start, module, output)
        self.failed = False  # an output could not be kept: the recording is not whole

    def __enter__(self) -> _Recording:
        events = self.events

        def pre(module: nn.Module, args: tuple) -> None:
            events.append((True, module, None))

        def post(module: nn.Module, args: tuple, out: object) -> None:
            try:
                kept = _detach(out)
            except Exception:  # an output type that cannot be rebuilt (a namedtuple)
                self.failed, kept = True, None
            events.append((False, module, kept))

        self.handles = []
        try:
            for m in self.root.modules():
                self.handles.append(m.register_forward_pre_hook(pre))
                self.handles.append(m.register_forward_hook(post))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class _Trunk:
    """Outputs of the model's modules that run before the layer, on one example.

    Recorded once: every module call of one forward pass is timed by hooks, and the calls
    that end before the layer starts (and lie inside no other such call) are kept with
    their outputs, together with the layer's own output. While :meth:`skipping` is active
    those modules return their recorded outputs (fresh copies, in call order) instead of
    running, until the layer is reached; later calls of the same modules (a module used
    again after the layer) run normally. Code in the model's ``forward`` outside modules
    still runs; it is cheap next to the convolutions it feeds.
    """

    def __init__(self, root: nn.Module, layer: nn.Module, run: Callable[[], object]) -> None:
        with _Recording(root) as recording, torch.no_grad():
            run()
        if recording.failed:
            raise TypeError("a module's output could not be recorded")
        self._keep(layer, recording.events)

    @classmethod
    def from_events(cls, layer: nn.Module, events: list[tuple[bool, nn.Module, object]]) -> _Trunk:
        """The trunk of a run recorded by :class:`_Recording` (one example, no gradients)."""
        trunk = cls.__new__(cls)
        trunk._keep(layer, events)
        return trunk

    def _keep(self, layer: nn.Module, events: list[tuple[bool, nn.Module, object]]) -> None:
        # the calls open when the layer starts are its ancestors
        stack: list[nn.Module] = []
        ancestors: list[nn.Module] | None = None
        for is_start, module, _ in events:
            if is_start and module is layer:
                ancestors = list(stack)
                break
            if is_start:
                stack.append(module)
            else:
                stack.pop()
        if ancestors is None:
            raise ValueError("the layer was not reached")
        self.layer = layer
        self.outputs: dict[int, list[object]] = {}
        self.modules: dict[int, nn.Module] = {}
        stack = []
        for is_start, module, out in events:
            if is_start:
                if module is layer:
                    break
                stack.append(module)
                continue
            stack.pop()
            if all(any(m is a for a in ancestors) for m in stack):
                # ends before the layer starts, inside no other call that does
                self.modules[id(module)] = module
                self.outputs.setdefault(id(module), []).append(out)
        layer_out = [out for is_start, m, out in events if m is layer and not is_start]
        self.modules[id(layer)] = layer
        self.outputs[id(layer)] = layer_out[:1]

    def skipping(self) -> _Skipping:
        """Context in which the recorded modules return their outputs."""
        return _Skipping(self)


def _map_tensors(out: object, fn: Callable[[Tensor], Tensor]) -> object:
    """``out`` with ``fn`` applied to every tensor in it (nested tuples and lists)."""
    if isinstance(out, Tensor):
        return fn(out)
    if isinstance(out, (tuple, list)):
        return type(out)(_map_tensors(o, fn) for o in out)
    return out


def _detach(out: object) -> object:
    return _map_tensors(out, Tensor.detach)


def _fresh(out: object) -> object:
    return _map_tensors(out, Tensor.clone)


class _Skipping:
    """Context in which the recorded modules return their outputs without running."""

    def __init__(self, trunk: _Trunk) -> None:
        self.trunk = trunk

    def __enter__(self) -> _Skipping:
        trunk = self.trunk
        state = {"reached": False}
        counters: dict[int, int] = {}
        self.saved: list[tuple[nn.Module, object]] = []

        def make(key: int, module: nn.Module, original: Callable) -> Callable:
            outs = trunk.outputs[key]

            def forward(*args: object, **kwargs: object) -> object:
                n = counters.get(key, 0)
                # the layer is marked reached by its pre-hook, before its forward
                late = state["reached"] and module is not trunk.layer
                if late or n >= len(outs):
                    return original(*args, **kwargs)
                counters[key] = n + 1
                return _fresh(outs[n])

            return forward

        def mark(module: nn.Module, args: tuple) -> None:
            state["reached"] = True

        for key, module in trunk.modules.items():
            had = "forward" in module.__dict__
            self.saved.append((module, module.__dict__.get("forward") if had else None))
            module.__dict__["forward"] = make(key, module, module.forward)
        self.handle = trunk.layer.register_forward_pre_hook(mark)
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()
        for module, previous in self.saved:
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = previous


#: checks decided once per model and layer: layer -> [(weakref to the forward function,
#: attribute_to_layer_input, {"trunk": bool, "broadcast": bool})]
_DECIDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class HookHead:
    """The head ``psi -> logits`` derived from the model by replacing the layer's output.

    The model is run on ``inputs`` (one example) with the layer's output replaced by the
    batch of points. This is the head of every reference too only when the layer is a
    *cut* (nothing from the input reaches the output around the layer, see
    :mod:`captum_repinterp.cuts`); at a layer inside a residual block it would carry the
    seed's own skip path, so ``fit`` refuses such a layer.

    Speed, each checked against the plain run (allclose) once per model and layer and
    dropped if it differs or fails:

    - the part of the model before the layer is not run again: the modules that finish
      before the layer return their outputs recorded on the example (``nn.Module``
      models only); ``trunk``, recorded while the seed was read (see
      :func:`record_trunk`), stands in for the recording run once the check has passed
      for this model and layer;
    - the example is not repeated ``B`` times: only the layer's output carries the batch
      (the rest of the model broadcasts or never looks at the input again).
    """

    def __init__(
        self,
        forward_func: Callable,
        layer: nn.Module,
        inputs: tuple[Tensor, ...],
        additional_forward_args: tuple | None,
        layout: LayerLayout,
        attribute_to_layer_input: bool = False,
        trunk: _Trunk | None = None,
    ) -> None:
        if any(t.shape[0] != 1 for t in inputs):
            raise ValueError("HookHead needs the inputs of exactly one example")
        self.forward_func = forward_func
        self.layer = layer
        self.inputs = inputs
        self.additional_forward_args = additional_forward_args
        self.layout = layout
        self.attribute_to_layer_input = attribute_to_layer_input
        self.broadcast: bool | None = None  # decided on the first call with B > 1
        self.trunk: _Trunk | None = None
        self.trunk_checked = False
        self._recorded: Tensor | None = None  # see _take_recorded
        self._read_trunk = trunk  # recorded while the seed was read, see _trunk_ok

    def _forward(self, psi: Tensor, inputs: tuple[Tensor, ...], extra: tuple | None) -> Tensor:
        _, _, out = forward_with_layer(
            self.forward_func,
            self.layer,
            inputs,
            extra,
            self.attribute_to_layer_input,
            replace=psi,
            layout=self.layout,
        )
        return out

    def _run(self, psi: Tensor, repeat: bool, rows: int | None = None) -> Tensor:
        b = psi.shape[0]
        inputs, extra = self.inputs, self.additional_forward_args
        if repeat and b > 1:
            inputs = tuple(t.expand(b, *t.shape[1:]).contiguous() for t in inputs)
            extra = expand_args(extra, b)
            out = self._forward(psi, inputs, extra)
        elif self._trunk_ok(psi):
            assert self.trunk is not None
            out = self._take_recorded(b)
            if out is None:
                with self.trunk.skipping():
                    out = self._forward(psi, inputs, extra)
        else:
            out = self._take_recorded(b)
            if out is None:
                out = self._forward(psi, inputs, extra)
        return flatten_logits(out, b if rows is None else rows)

    def _take_recorded(self, b: int) -> Tensor | None:
        """The output of the run that recorded the trunk, when this call asks for the
        same thing: that run was the whole model at this call's one row (``psi[:1]``,
        with the same module replacements), without gradients. Taken once."""
        out, self._recorded = self._recorded, None
        if out is None or b != 1 or torch.is_grad_enabled():
            return None
        return out

    def _decided(self) -> dict[str, bool]:
        """The checks already decided for this model and layer (shared by all seeds)."""
        per_layer = _DECIDED.setdefault(self.layer, [])
        for ref, key, decisions in per_layer:
            if ref() is self.forward_func and key == self.attribute_to_layer_input:
                return decisions
        try:
            ref = weakref.ref(self.forward_func)
        except TypeError:
            return {}  # cannot be remembered: decided per seed
        decisions: dict[str, bool] = {}
        per_layer[:] = [e for e in per_layer if e[0]() is not None]
        per_layer.append((ref, self.attribute_to_layer_input, decisions))
        return decisions

    def _trunk_ok(self, psi: Tensor) -> bool:
        """Whether the recorded trunk may stand in for running it (decided once per
        model and layer; recorded once per seed)."""
        if self.trunk_checked:
            return self.trunk is not None
        self.trunk_checked = True
        if not isinstance(self.forward_func, nn.Module) or self.attribute_to_layer_input:
            return False
        decided = self._decided()
        if decided.get("trunk") is False:
            return False
        read_trunk, self._read_trunk = self._read_trunk, None
        if decided.get("trunk") and read_trunk is not None:
            # the seed's read was the recording run: no run of the whole model here
            self.trunk = read_trunk
            return True
        probe = psi[:1].detach()
        recorded: list[Tensor] = []

        def run() -> Tensor:
            out = self._forward(probe, self.inputs, self.additional_forward_args)
            recorded.append(out)
            return out

        try:
            self.trunk = _Trunk(self.forward_func, self.layer, run)
            self._recorded = recorded[0] if recorded else None
            if decided.get("trunk"):
                return True
            with torch.no_grad():
                full = self._forward(probe, self.inputs, self.additional_forward_args)
                with self.trunk.skipping():
                    fast = self._forward(probe, self.inputs, self.additional_forward_args)
            ok = fast.shape == full.shape and torch.allclose(fast, full, rtol=1e-5, atol=1e-6)
        except (RuntimeError, ValueError, TypeError, AttributeError, IndexError):
            ok = False
        decided["trunk"] = bool(ok)
        if not ok:
            self.trunk = None
        return bool(ok)

    def __call__(self, psi: Tensor, rows: int | None = None) -> Tensor:
        """Logits ``B x C`` at features ``psi`` (``B x D``).

        ``rows``: the number of output rows to expect when it differs from ``B`` (a
        hook further down replaces a tensor by a batch, see ``ProjectedHead``).
        """
        if rows is not None:
            return self._run(psi, repeat=True, rows=rows)
        if self.broadcast is None and psi.shape[0] > 1:
            self.broadcast = self._decided().get("broadcast")
        if psi.shape[0] == 1 or self.broadcast is False:
            return self._run(psi, repeat=True)
        if self.broadcast:
            return self._run(psi, repeat=False)
        full = self._run(psi, repeat=True)
        try:
            with torch.no_grad():
                fast = self._run(psi.detach(), repeat=False)
            self.broadcast = fast.shape == full.shape and torch.allclose(
                fast, full.detach(), rtol=1e-5, atol=1e-6
            )
        except (RuntimeError, ValueError):
            self.broadcast = False
        self._decided()["broadcast"] = self.broadcast
        return full


def trunk_decided(
    forward_func: Callable, layer: nn.Module, attribute_to_layer_input: bool = False
) -> bool:
    """Whether :class:`HookHead` has found, for this model and layer, that the recorded
    trunk stands in for running it (then a trunk recorded elsewhere is used as is)."""
    if not isinstance(forward_func, nn.Module) or attribute_to_layer_input:
        return False
    for ref, key, decisions in _DECIDED.get(layer, []):
        if ref() is forward_func and key == attribute_to_layer_input:
            return decisions.get("trunk") is True
    return False


@contextmanager
def record_trunk(root: nn.Module, layer: nn.Module) -> Iterator[list[_Trunk]]:
    """Record the trunk of the one-example run of ``root`` inside the block, as
    :class:`HookHead`'s recording run would (the list yielded gets it at the end).

    The run itself is not changed (the layer's output goes on as it is, so the model's
    output is its own, also when the layer's output aliases a tensor the model uses
    after it). Instead, when the layer ends, the recorded outputs that share memory with
    the layer's output are replaced by copies, so that what the model writes into the
    layer's output after it does not reach the trunk: the recording run's layer output
    is a replacement, which nothing recorded shares memory with.
    """
    found: list[_Trunk] = []

    with _Recording(root) as recording:
        events = recording.events

        def protect(module: nn.Module, args: tuple, out: object) -> None:
            shared = _storages(out)
            if shared is None:  # memory that cannot be told apart (a sparse tensor)
                recording.failed = True  # no trunk: the head records its own
                return
            for i, (is_start, m, kept) in enumerate(events):
                if shared and not is_start and (_storages(kept) or set()) & shared:
                    events[i] = (is_start, m, _map_tensors(kept, _copy_if(shared)))

        # after the recording's own hook, so that the layer's end is among the events
        handle = layer.register_forward_hook(protect)
        try:
            yield found
        finally:
            handle.remove()
    if recording.failed:
        return
    try:
        found.append(_Trunk.from_events(layer, recording.events))
    except ValueError:  # the layer was not reached: nothing to keep
        pass


def _storages(out: object) -> set[int] | None:
    """The addresses of the memory of the tensors in ``out`` (nested tuples and lists);
    None when a tensor has no memory of its own to tell (a sparse tensor)."""
    found: set[int] = set()
    unknown: list[Tensor] = []

    def add(t: Tensor) -> Tensor:
        ptr = _storage(t)
        if ptr is None:
            unknown.append(t)
        elif ptr:  # empty tensors share nothing
            found.add(ptr)
        return t

    _map_tensors(out, add)
    return None if unknown else found


def _storage(t: Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _copy_if(shared: set[int]) -> Callable[[Tensor], Tensor]:
    def copy(t: Tensor) -> Tensor:
        return t.clone() if _storage(t) in shared else t

    return copy


class UserHead:
    """Wraps a user-given ``head(layer_output) -> logits`` to take ``B x D`` features."""

    def __init__(self, head: Callable, layout: LayerLayout) -> None:
        self.head = head
        self.layout = layout

    def __call__(self, psi: Tensor, rows: int | None = None) -> Tensor:
        """Logits ``B x C`` at features ``psi``; ``rows`` as in :class:`HookHead`."""
        parts = self.layout.unflatten(psi)
        out = self.head(parts if self.layout.is_tuple else parts[0])
        if not isinstance(out, Tensor):
            raise TypeError(f"head must return a tensor, got {type(out).__name__}")
        return flatten_logits(out, psi.shape[0] if rows is None else rows)


def make_head(
    forward_func: Callable,
    layer: nn.Module,
    layout: LayerLayout,
    head: Callable | None,
    inputs: tuple[Tensor, ...],
    additional_forward_args: tuple | None,
    attribute_to_layer_input: bool = False,
    trunk: _Trunk | None = None,
) -> HookHead | UserHead:
    """The head for one seed: the user's ``head`` when given, else a :class:`HookHead`
    anchored at ``inputs`` (one example; ``trunk``: recorded when it was read)."""
    if head is not None:
        return UserHead(head, layout)
    return HookHead(
        forward_func,
        layer,
        inputs,
        additional_forward_args,
        layout,
        attribute_to_layer_input,
        trunk=trunk,
    )
