"""Whether the model changed after ``fit``.

The references' features, predictions, logits and the head's shortcuts are the weights'
they were computed with; a model changed in place afterwards (an optimizer step,
``load_state_dict``, a BatchNorm forward in training mode) would give regions of the old
model, silently. Each call of the explainer first compares a cheap stamp of every
parameter and buffer (identity, storage address and PyTorch's in-place version counter);
only when the stamp moved are the values hashed and compared with their hash at ``fit``.
Writes through ``.data`` bypass the version counter and are not seen.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from .store import model_fingerprint

__all__ = ["ModelWatch"]


def _stamp(model: nn.Module) -> tuple[tuple[int, int, int], ...]:
    return tuple(
        (id(t), t.data_ptr(), t._version)
        for t in itertools.chain(model.parameters(), model.buffers())
    )


class ModelWatch:
    """The stamp and the weights' hash (:func:`~captum_repinterp.store.model_fingerprint`)
    of a model, taken at ``fit``."""

    def __init__(self, model: nn.Module, fingerprint: str | None = None) -> None:
        self.model = model
        # the on-disk store's record of the same weights, when fit just wrote or checked it
        self.fingerprint = fingerprint or model_fingerprint(model)
        self.stamp = _stamp(model)

    @classmethod
    def of(cls, model: Any, fingerprint: str | None = None) -> ModelWatch | None:
        """A watch of ``model`` (``fingerprint``: its weights' hash when already known),
        or None when it is not an ``nn.Module`` (a plain function's weights cannot be
        listed)."""
        return cls(model, fingerprint) if isinstance(model, nn.Module) else None

    def check(self) -> None:
        """Raise when the weights differ from those at ``fit``.

        Raises
        ------
        ValueError
            Naming ``forward_func``.
        """
        now = _stamp(self.model)
        if now == self.stamp:
            return
        if model_fingerprint(self.model) != self.fingerprint:
            raise ValueError(
                "forward_func: the model's parameters or buffers changed after fit (an "
                "optimizer step, load_state_dict, a forward pass in training mode); the "
                "references' features and predictions are the old weights': call fit "
                "again"
            )
        self.stamp = now  # touched in place, same values

    @contextmanager
    def watching(self) -> Iterator[None]:
        """Check on entry; on exit take the stamp again, so that a model whose forward
        pass writes a buffer in place (with the same or new values) is not taken for a
        changed one by the next call."""
        self.check()
        try:
            yield
        finally:
            self.stamp = _stamp(self.model)
