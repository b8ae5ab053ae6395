"""Reading the split layer on new inputs (seeds, held-out images).

A :class:`LayerReader` knows the model, the layer and what ``fit`` learned of the inputs
(their spec and the layer's layout). It checks new inputs against the references, runs the
model with a hook on the layer and gives the layer's tensors, the features ``psi``, the
head for one seed and the maps of a direction at another layer. Interpretations keep a
reader, so that a saved region can be used as a rule on new images.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ._captum_compat import _format_additional_forward_args
from ._checks import check_grad_mode
from .features import (
    LayerLayout,
    eval_mode,
    extract_features,
    forward_with_layer,
    model_device,
)
from .heads import HookHead, UserHead, make_head, record_trunk, trunk_decided
from .heatmap import pulled_back_heatmap
from .inputs import (
    InputSpec,
    check_against_references,
    expand_args,
    format_inputs,
    slice_args,
    translate_forward_error,
)

__all__ = ["LayerReader"]


class LayerReader:
    """The split layer of a fitted model, read on new inputs.

    Parameters
    ----------
    forward_func : callable
        The model.
    layer : nn.Module
        The split layer.
    layout : LayerLayout
        Shapes of the layer's tensors (from ``fit``).
    input_spec : InputSpec
        Per-example shapes and dtypes of the reference inputs (from ``fit``).
    attribute_to_layer_input : bool
        Read the layer's input instead of its output.
    head : callable, optional
        The user's ``head(layer_output) -> logits``.
    """

    def __init__(
        self,
        forward_func: Callable,
        layer: nn.Module,
        layout: LayerLayout,
        input_spec: InputSpec | None,
        attribute_to_layer_input: bool = False,
        head: Callable | None = None,
    ) -> None:
        self.forward_func = forward_func
        self.layer = layer
        self.layout = layout
        self.input_spec = input_spec
        self.attribute_to_layer_input = attribute_to_layer_input
        self.head = head

    @property
    def device(self) -> torch.device | None:
        """Device of the model's parameters (None when it has none)."""
        return model_device(self.forward_func, self.layer)

    def read(
        self,
        inputs: Any,
        additional_forward_args: Any = None,
        trunks: list[Any] | None = None,
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        """Layer tensors and model output of new inputs, one example at a time.

        One example per forward pass, so that an example's features (and everything
        decided from them) do not depend on which batch it came in.

        ``trunks``: a list that gets, when there is one example, the trunk recorded
        during its run for the seed's head (see :func:`~captum_repinterp.heads.record_trunk`),
        where the head would record one itself; else nothing (the head records it).

        Returns
        -------
        (activations, outputs)
            The layer's tensors (``n x ...`` each, as the layer gives them) and the
            model's outputs (``n x ...``).

        Raises
        ------
        ValueError, TypeError
            Naming ``inputs`` when they are not shaped or typed like the references.
        """
        inputs_t = format_inputs(inputs)
        check_against_references(inputs_t, self.input_spec, "inputs")
        extra = _format_additional_forward_args(additional_forward_args)
        device = self.device
        n = inputs_t[0].shape[0]
        if n == 0:  # nothing to run: empty tensors shaped like the layer's, in the
            # inputs' floating-point type (float64 inputs gave float32 maps before)
            first = inputs_t[0]
            dtype = first.dtype if first.is_floating_point() else torch.get_default_dtype()
            empty = tuple(
                torch.zeros(0, *s, device=device, dtype=dtype) for s in self.layout.shapes
            )
            return empty, torch.zeros(0, 0, device=device, dtype=dtype)
        acts: list[tuple[Tensor, ...]] = []
        outs: list[Tensor] = []
        # one example only: a batch would hold a trunk per example at once
        record = trunks is not None and n == 1 and self._head_records_trunk()
        with eval_mode(self.forward_func, self.layer, warn=True), torch.no_grad():
            for i in range(n):
                one = tuple(t[i : i + 1].detach() for t in inputs_t)
                if device is not None:
                    one = tuple(t.to(device) for t in one)
                recording = (
                    record_trunk(self.forward_func, self.layer)
                    if record
                    else contextlib.nullcontext([])
                )
                with recording as found:
                    tensors, was_tuple, out = forward_with_layer(
                        self.forward_func,
                        self.layer,
                        one,
                        slice_args(extra, n, i, i + 1),
                        self.attribute_to_layer_input,
                        name="inputs",
                        expected=self.input_spec,
                    )
                layout = LayerLayout.from_outputs(tensors, was_tuple)
                if layout != self.layout:
                    given = ", ".join(str(tuple(t.shape[1:])) for t in inputs_t)
                    refs = (
                        ", ".join(str(s) for s, _ in self.input_spec)
                        if self.input_spec is not None
                        else "?"
                    )
                    raise ValueError(
                        f"inputs: examples of shape {given} give the layer shapes "
                        f"{layout.shapes}, but the references (examples of shape {refs}) "
                        f"gave {self.layout.shapes}; use inputs shaped like the references"
                    )
                acts.append(tensors)
                outs.append(out)
        if record and found and trunks is not None:
            trunks.extend(found)
        activations = tuple(torch.cat(parts) for parts in zip(*acts))
        return activations, torch.cat(outs)

    def _head_records_trunk(self) -> bool:
        """Whether the seed's head would record the trunk in a run of its own and use
        it (the model's head, a module, the check passed for this layer)."""
        return self.head is None and trunk_decided(
            self.forward_func, self.layer, self.attribute_to_layer_input
        )

    def features(
        self,
        inputs: Any,
        batch_size: int = 128,
        additional_forward_args: Any = None,
        progress: bool = False,
        name: str = "inputs",
    ) -> tuple[Tensor, Tensor]:
        """Layer features (``N x D`` float32, CPU) and predictions of inputs, batched.

        Accepts what ``fit`` accepts (tensor, tuple, Dataset, DataLoader); errors about
        the inputs name them ``name``. An empty batch gives empty results, as
        ``contains``, ``distance`` and ``attribute`` do.
        """
        first = inputs[0] if isinstance(inputs, tuple) and inputs else inputs
        if isinstance(first, Tensor) and first.dim() > 0 and first.shape[0] == 0:
            return torch.zeros(0, self.layout.dim), torch.zeros(0, dtype=torch.long)
        with eval_mode(self.forward_func, self.layer, warn=True):
            features, predictions, layout, _ = extract_features(
                self.forward_func,
                self.layer,
                inputs,
                batch_size=batch_size,
                additional_forward_args=additional_forward_args,
                attribute_to_layer_input=self.attribute_to_layer_input,
                device=self.device,
                progress=progress,
                name=name,
                expected=self.input_spec,
            )
        if layout != self.layout:
            raise ValueError(
                f"{name}: layer shapes {layout.shapes} differ from the references' "
                f"{self.layout.shapes}"
            )
        return features, predictions

    def features_of(self, batch: Tensor, additional_forward_args: tuple | None = None) -> Tensor:
        """Features (``B x D``) of a batch of single-tensor inputs, extra arguments of one
        example broadcast to the batch (no checks: for inputs derived from a seed)."""
        args = expand_args(additional_forward_args, batch.shape[0])
        with torch.no_grad():
            tensors, _, _ = forward_with_layer(
                self.forward_func, self.layer, (batch,), args, self.attribute_to_layer_input
            )
        return self.layout.flatten(tensors)

    def head_for(
        self,
        inputs: tuple[Tensor, ...],
        additional_forward_args: tuple | None,
        trunk: Any = None,
    ) -> HookHead | UserHead:
        """The head ``B x D -> B x C`` for one seed (``inputs``: one example; ``trunk``:
        recorded when it was read, see :meth:`read`)."""
        return make_head(
            self.forward_func,
            self.layer,
            self.layout,
            self.head,
            inputs,
            additional_forward_args,
            self.attribute_to_layer_input,
            trunk=trunk,
        )

    def pulled_back(
        self,
        inputs: Any,
        additional_forward_args: Any,
        directions: Tensor,
        heatmap_layer: nn.Module,
        relu: bool = True,
        attr_dim_summation: bool = True,
    ) -> tuple[Tensor, ...]:
        """Maps of ``directions`` drawn at ``heatmap_layer`` (see
        :func:`~captum_repinterp.heatmap.pulled_back_heatmap`).

        Inputs are checked against the references as in :meth:`read`, and a model
        failure on wrongly shaped or typed inputs is translated the same way.
        """
        check_grad_mode("a heat map at heatmap_layer")
        inputs_t = format_inputs(inputs)
        check_against_references(inputs_t, self.input_spec, "inputs")
        extra = _format_additional_forward_args(additional_forward_args)
        device = self.device
        if device is not None:
            inputs_t = tuple(t.to(device) for t in inputs_t)
            directions = directions.to(device)
        with eval_mode(self.forward_func, self.layer, heatmap_layer, warn=True):
            try:
                return pulled_back_heatmap(
                    self.forward_func,
                    self.layer,
                    heatmap_layer,
                    inputs_t,
                    extra,
                    directions,
                    self.layout,
                    self.attribute_to_layer_input,
                    relu,
                    attr_dim_summation,
                )
            except (RuntimeError, TypeError) as exc:
                translated = translate_forward_error(exc, inputs_t, "inputs", self.input_spec)
                if translated is None:
                    raise
                raise translated from exc
