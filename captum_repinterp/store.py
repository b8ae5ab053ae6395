"""An on-disk reference store: features and predictions as memory-mapped ``.npy`` files.

``RepresentativeInterpretation.fit(references, store=path)`` writes the layer features
(``N x D`` float32), predictions (``N`` int64) and, when they are small next to the
features, the model's outputs (``N x C``) of the references batch by batch into a
directory::

    path/
        meta.json          {"n": rows written, "capacity": rows allocated, "dim": D,
                            "layout": ..., "attribute_to_layer_input": ..., "complete": ...,
                            "logits": {"classes": C, "dtype": ...} when logits.npy is kept}
        features.npy       capacity x D float32  (numpy.lib.format.open_memmap)
        predictions.npy    capacity int64
        logits.npy         capacity x C float32 (float64 for a float64 model), optional

Only ``meta["n"]`` rows are valid; ``meta.json`` is rewritten (atomically) after every
batch, once that batch's rows are flushed, so an interrupted fit leaves a consistent
store whose ``n`` rows can be trusted.

Afterwards ``features_`` / ``predictions_`` are copy-on-write tensors backed by the memory
maps (no copy in RAM); every later step reads them in row chunks
(:func:`captum_repinterp.match.margins`), so the resident memory does not grow with
``N x D``: the operating system pages the file in and out as needed.

Resume and append (see :meth:`RepresentativeInterpretation.fit`):

- resume: ``fit(references, store=path)`` on an incomplete store (an interrupted fit)
  skips the ``n`` references already written and continues with the rest; the
  references must be the same sequence as in the interrupted call.
- append: ``fit(more, store=path, append=True)`` adds ``more`` after the rows already
  stored (the file grows by doubling its capacity, copied in chunks); the rows it
  appends are checked as a new store's first rows are, so a model that mixes a batch or
  gives other values from run to run is refused. An interrupted append is resumed the
  same way, by calling it again (the same references, ``append=True``): ``meta.json``
  keeps the row it started at (``"append_from"``) until it finishes. An interrupted fit
  is resumed with the ``append`` it was called with; the other is refused, as it would
  skip or repeat rows.
- one writer at a time: the directory is locked (:class:`StoreLock`) while a fit writes,
  and a second fit of the store meanwhile (another process) is refused.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch import Tensor, nn

from .features import Example, LayerLayout, feature_batches, module_name
from .inputs import all_finite, rows_read

__all__ = [
    "OutputRecorder",
    "ReferenceStore",
    "StoreLock",
    "STORE_FILES",
    "STORE_FORMAT",
    "keep_logits",
    "model_fingerprint",
    "tensor_sha1",
]

STORE_FORMAT = "captum_repinterp.reference_store/1"

#: The files a store writes next to its ``meta.json`` (``projected.npy``: the features'
#: projection, written by ``fit``; see :mod:`captum_repinterp.references`)
STORE_FILES = ("features.npy", "predictions.npy", "logits.npy", "projected.npy")
_COPY_CHUNK = 16384


def keep_logits(n_classes: int, dim: int) -> bool:
    """Whether the references' ``N x C`` logits are kept next to their ``N x D`` features:
    when ``C <= max(D / 4, 64)``, a quarter of the features at most (or a few numbers
    per reference)."""
    return n_classes <= max(dim // 4, 64)


def logits_dtype(dtype: torch.dtype) -> torch.dtype:
    """The type the logits are kept in: float64 for a float64 model, float32 otherwise
    (which holds the half types exactly)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class OutputRecorder:
    """``forward_func``, keeping a copy of each call's flattened output on the CPU.

    ``fit`` runs the model on every reference anyway; its outputs are the head's logits at
    the references' features (at a cut), which the per-seed search would otherwise
    evaluate again at the segments' ends. ``last`` is the latest call's ``B x C`` output
    (None when it was not a ``B x ...`` tensor); with ``keep`` every call's is appended to
    ``batches``.
    """

    def __init__(self, forward_func: Any, keep: bool = True) -> None:
        self.forward_func = forward_func
        self.keep = keep
        self.batches: list[Tensor] = []
        self.last: Tensor | None = None

    def __call__(self, *args: Any) -> Any:
        out = self.forward_func(*args)
        self.last = None
        if isinstance(out, Tensor) and out.dim() >= 2 and out.is_floating_point():
            flat = out.detach().reshape(out.shape[0], -1)
            self.last = flat.to("cpu", logits_dtype(flat.dtype), copy=True)
            if self.keep:
                self.batches.append(self.last)
        return out


def _readonly_tensor(array: np.ndarray) -> Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(array)


class ReferenceStore:
    """Features and predictions of references in memory-mapped ``.npy`` files.

    Use :meth:`create` or :meth:`open`; :meth:`write` appends rows.

    Parameters
    ----------
    path : str or os.PathLike
        The store's directory.
    meta : dict
        Its ``meta.json`` content.
    """

    def __init__(self, path: str | os.PathLike, meta: dict[str, Any]) -> None:
        self.path = Path(path)
        self.meta = meta
        self._features: np.memmap | None = None
        self._predictions: np.memmap | None = None
        self._logits: np.memmap | None = None

    # ------------------------------------------------------------------ files
    @property
    def _meta_path(self) -> Path:
        return self.path / "meta.json"

    @property
    def _feat_path(self) -> Path:
        return self.path / "features.npy"

    @property
    def _pred_path(self) -> Path:
        return self.path / "predictions.npy"

    @property
    def _logits_path(self) -> Path:
        return self.path / "logits.npy"

    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        """Whether ``path`` holds a store (a ``meta.json`` of this format)."""
        return (Path(path) / "meta.json").is_file()

    @classmethod
    def open(cls, path: str | os.PathLike) -> ReferenceStore:
        """Open an existing store.

        Raises
        ------
        ValueError
            When ``path`` holds no store of this format, or a damaged one: ``meta.json``
            unreadable or inconsistent, an array missing, truncated, or of another type
            or shape than ``meta.json`` says (checked from the files' headers and sizes).
        """
        meta_path = Path(path) / "meta.json"
        if not meta_path.is_file():
            raise ValueError(f"store: no reference store at {os.fspath(path)!r}")
        try:
            meta = json.loads(meta_path.read_text())
        except (ValueError, OSError) as exc:  # JSONDecodeError, UnicodeDecodeError
            raise _damaged(path, f"meta.json cannot be read: {exc}") from exc
        if not isinstance(meta, dict):
            raise _damaged(path, "meta.json does not hold an object")
        if meta.get("format") != STORE_FORMAT:
            raise ValueError(
                f"store: {os.fspath(path)!r} has format {meta.get('format')!r}, "
                f"expected {STORE_FORMAT!r}"
            )
        store = cls(path, meta)
        store._validate()
        return store

    def _validate(self) -> None:
        """Check ``meta.json`` against itself and the arrays' headers and file sizes (no
        data is read): a damaged store raises ``ValueError`` naming ``store``."""
        meta = self.meta
        n, cap, dim = meta.get("n"), meta.get("capacity"), meta.get("dim")
        if not all(type(v) is int for v in (n, cap, dim)) or not 0 <= n <= cap or dim < 1:
            raise _damaged(self.path, f"meta.json has n={n!r}, capacity={cap!r}, dim={dim!r}")
        try:
            layout = LayerLayout.from_json(meta["layout"])
            flags = (meta["attribute_to_layer_input"], meta["complete"])
        except (KeyError, TypeError, ValueError) as exc:
            raise _damaged(self.path, f"meta.json's layout or flags: {exc!r}") from exc
        if layout.dim != dim or not all(isinstance(f, bool) for f in flags):
            raise _damaged(self.path, "meta.json's layout, dim or flags do not agree")
        arrays = [(self._feat_path, np.float32, (dim,)), (self._pred_path, np.int64, ())]
        info = meta.get("logits")
        if info is not None and self._logits_path.is_file():
            try:
                arrays.append((self._logits_path, np.dtype(info["dtype"]), (info["classes"],)))
            except (KeyError, TypeError) as exc:
                raise _damaged(self.path, f"meta.json's logits: {exc!r}") from exc
        for file, dtype, row in arrays:
            try:  # maps the file (checks its header and size), reads nothing
                arr = np.load(file, mmap_mode="r")
            except (OSError, ValueError, EOFError) as exc:
                raise _damaged(self.path, f"{file.name}: {exc}") from exc
            if arr.dtype != dtype or arr.shape[1:] != row or arr.shape[0] < n:
                raise _damaged(
                    self.path,
                    f"{file.name} is {arr.dtype} of shape {arr.shape}, expected "
                    f"{np.dtype(dtype)} of at least {n} rows of shape {row}",
                )
            del arr

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        layout: LayerLayout,
        capacity: int,
        attribute_to_layer_input: bool = False,
    ) -> ReferenceStore:
        """Create an empty store with room for ``capacity`` rows (it grows if needed).

        Raises
        ------
        ValueError
            Naming ``store``: ``path`` is a file or cannot be made a directory, already
            holds a store, or holds files of the names a store writes
            (:data:`STORE_FILES`), which it would overwrite.
        """
        p = Path(path)
        if p.exists() and not p.is_dir():
            raise ValueError(f"store: {os.fspath(path)!r} exists and is not a directory")
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a parent is a file, no permission
            raise ValueError(
                f"store: cannot make the directory {os.fspath(path)!r} ({exc})"
            ) from exc
        if cls.exists(p):
            raise ValueError(f"store: {os.fspath(path)!r} already holds a reference store")
        # files of the names a store writes, not a store's (no meta.json): the user's
        taken = sorted(name for name in STORE_FILES if (p / name).exists())
        if taken:
            raise ValueError(
                f"store: {os.fspath(path)!r} holds {', '.join(taken)} but no reference "
                "store, and a store would overwrite them; use a new or empty directory"
            )
        capacity = max(int(capacity), 1)
        meta = {
            "format": STORE_FORMAT,
            "n": 0,
            "capacity": capacity,
            "dim": int(layout.dim),
            "layout": layout.to_json(),
            "attribute_to_layer_input": bool(attribute_to_layer_input),
            "complete": False,
        }
        store = cls(p, meta)
        open_memmap(store._feat_path, mode="w+", dtype=np.float32, shape=(capacity, layout.dim))
        open_memmap(store._pred_path, mode="w+", dtype=np.int64, shape=(capacity,))
        store._save_meta()
        return store

    def _save_meta(self) -> None:
        tmp = self._meta_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.meta, indent=1))
        os.replace(tmp, self._meta_path)

    # ------------------------------------------------------------------ properties
    @property
    def n(self) -> int:
        """Rows written (valid)."""
        return int(self.meta["n"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def layout(self) -> LayerLayout:
        return LayerLayout.from_json(self.meta["layout"])

    @property
    def attribute_to_layer_input(self) -> bool:
        return bool(self.meta["attribute_to_layer_input"])

    @property
    def complete(self) -> bool:
        return bool(self.meta["complete"])

    @property
    def has_logits(self) -> bool:
        """Whether the store keeps the references' logits (``logits.npy``)."""
        return self.meta.get("logits") is not None and self._logits_path.is_file()

    def __len__(self) -> int:
        return self.n

    # ------------------------------------------------------------------ writing
    def _writable(self) -> tuple[np.memmap, np.memmap]:
        if self._features is None or self._features.mode != "r+":
            self._close()
            self._features = open_memmap(self._feat_path, mode="r+")
            self._predictions = open_memmap(self._pred_path, mode="r+")
            if self.has_logits:
                self._logits = open_memmap(self._logits_path, mode="r+")
        return self._features, self._predictions  # type: ignore[return-value]

    def _close(self) -> None:
        for arr in (self._features, self._predictions, self._logits):
            if arr is not None and isinstance(arr, np.memmap) and arr.mode == "r+":
                arr.flush()
        self._features = None
        self._predictions = None
        self._logits = None

    def _drop_logits(self) -> None:
        """Stop keeping logits (a batch came without them, or with another width)."""
        self._close()
        self.meta["logits"] = None
        self._save_meta()
        self._logits_path.unlink(missing_ok=True)

    def _start_logits(self, logits: Tensor) -> None:
        """Keep logits from the first row on, in a file shaped like the others."""
        dtype = np.float64 if logits.dtype == torch.float64 else np.float32
        shape = (int(self.meta["capacity"]), int(logits.shape[1]))
        self._close()
        open_memmap(self._logits_path, mode="w+", dtype=dtype, shape=shape)
        self.meta["logits"] = {"classes": shape[1], "dtype": np.dtype(dtype).name}
        self._save_meta()

    def _grow(self, needed: int) -> None:
        """Reallocate the files with room for ``needed`` rows, copying in chunks."""
        new_cap = max(needed, 2 * int(self.meta["capacity"]), 1024)
        self._close()
        files = [
            (self._feat_path, np.float32, (new_cap, self.dim)),
            (self._pred_path, np.int64, (new_cap,)),
        ]
        if self.has_logits:
            info = self.meta["logits"]
            files.append((self._logits_path, np.dtype(info["dtype"]), (new_cap, info["classes"])))
        for src_path, dtype, shape in files:
            tmp = src_path.with_suffix(".tmp.npy")
            dst = open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
            src = open_memmap(src_path, mode="r")
            for s in range(0, self.n, _COPY_CHUNK):
                dst[s : min(s + _COPY_CHUNK, self.n)] = src[s : min(s + _COPY_CHUNK, self.n)]
            dst.flush()
            del dst, src
            os.replace(tmp, src_path)
        self.meta["capacity"] = new_cap
        self._save_meta()

    def write(self, features: Tensor, predictions: Tensor, logits: Tensor | None = None) -> None:
        """Append rows (``B x D`` features, ``B`` predictions and, optionally, ``B x C``
        logits); flushed, then counted.

        Logits are kept only from the store's first row on and while every batch brings
        them with the same ``C``; otherwise the store stops keeping them.
        """
        b = int(features.shape[0])
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be B x {self.dim}, got shape {tuple(features.shape)}")
        if predictions.shape != (b,):
            raise ValueError(f"predictions must have shape ({b},), got {tuple(predictions.shape)}")
        if logits is not None and (logits.dim() != 2 or logits.shape[0] != b):
            raise ValueError(f"logits must be {b} x C, got shape {tuple(logits.shape)}")
        if self.has_logits:
            if logits is None or logits.shape[1] != self.meta["logits"]["classes"]:
                self._drop_logits()
        elif logits is not None and self.n == 0 and keep_logits(logits.shape[1], self.dim):
            self._start_logits(logits)
        if self.n + b > int(self.meta["capacity"]):
            self._grow(self.n + b)
        feats, preds = self._writable()
        s = self.n
        feats[s : s + b] = features.detach().to("cpu", torch.float32).numpy()
        preds[s : s + b] = predictions.detach().to("cpu", torch.int64).numpy()
        feats.flush()
        preds.flush()
        if self._logits is not None and logits is not None:
            self._logits[s : s + b] = logits.detach().cpu().numpy().astype(self._logits.dtype)
            self._logits.flush()
        self.meta["n"] = s + b
        self.meta["complete"] = False
        self._save_meta()

    def mark_complete(self) -> None:
        """Record that the fit that wrote this store finished."""
        self._close()
        self.meta["complete"] = True
        self.meta.pop("append_from", None)
        self._save_meta()

    # ------------------------------------------------------------------ reading
    def features(self) -> Tensor:
        """``n x D`` float32 tensor backed by the memory map (no copy).

        Mapped copy-on-write: in-place changes stay in this process's memory and never
        reach the file.
        """
        self._close()
        arr = open_memmap(self._feat_path, mode="c")
        return _readonly_tensor(arr[: self.n])

    def predictions(self) -> Tensor:
        """``n`` int64 tensor backed by the memory map (no copy; copy-on-write)."""
        arr = open_memmap(self._pred_path, mode="c")
        return _readonly_tensor(arr[: self.n])

    def logits(self) -> Tensor | None:
        """``n x C`` logits backed by the memory map (copy-on-write), or None when the
        store does not keep them (see :meth:`write`)."""
        if not self.has_logits:
            return None
        arr = open_memmap(self._logits_path, mode="c")
        return _readonly_tensor(arr[: self.n])

    def all_finite(self, chunk_size: int = _COPY_CHUNK) -> bool:
        """Whether every stored feature is finite (streamed in chunks)."""
        return all_finite(self.features(), chunk_elements=chunk_size * self.layout.dim)


def _damaged(path: Any, what: str) -> ValueError:
    return ValueError(
        f"store: {os.fspath(path)!r} is damaged ({what}); delete it and fit to it again"
    )


def tensor_sha1(t: Tensor) -> str:
    """SHA-1 of a tensor's dtype, shape and bytes (on the CPU)."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha1(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_fingerprint(model: Any) -> str | None:
    """SHA-1 of a model's parameters and buffers (names and :func:`tensor_sha1`), or
    None when ``model`` is not an ``nn.Module``. Two models with the same weights give
    the same fingerprint; any changed value, dtype or shape gives another."""
    if not isinstance(model, nn.Module):
        return None
    digest = hashlib.sha1()
    for name, t in model.state_dict(keep_vars=False).items():
        if not isinstance(t, Tensor):
            continue
        try:
            digest.update(f"{name}:{tensor_sha1(t)};".encode())
        except (RuntimeError, TypeError):  # a type without a byte view (quantized)
            digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
    return digest.hexdigest()


def _check_fingerprint(store: ReferenceStore, fingerprint: str | None, path: Any) -> None:
    """Refuse a store written by another model (stores without a fingerprint pass)."""
    stored = store.meta.get("model")
    if fingerprint is not None and stored is not None and stored != fingerprint:
        raise ValueError(
            f"store: {os.fspath(path)!r} was written by a model with other weights (its "
            "parameters and buffers differ from this model's); its rows cannot be mixed "
            "with these or reused: use a new path"
        )


def _check_layer(store: ReferenceStore, name: str | None, path: Any) -> None:
    """Refuse a store fitted at another layer of the model (stores without the name, or
    a model that does not name its layer, pass): a layer of the same shape (a conv and
    the ReLU after it) would otherwise mix two layers' features when appending."""
    stored = store.meta.get("layer")
    if name is not None and stored is not None and stored != name:
        raise ValueError(
            f"store: {os.fspath(path)!r} was fitted at the model's layer {stored!r}, not "
            f"at {name!r}; its rows cannot be mixed with these or reused: use a new path"
        )


#: Descriptors of the store locks this process holds; a forked child (a DataLoader
#: worker) closes its copies at once, so that it cannot keep a lock after the fit ends.
_HELD_LOCKS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in list(_HELD_LOCKS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


class StoreLock:
    """An exclusive advisory lock (``flock``) on a store's directory, held while a fit
    writes to it, so that two processes cannot write one store at once (the second would
    take the first's running fit or append for an interrupted one and write into it).
    A no-op where ``fcntl`` is missing (Windows), where the file system refuses locks
    (some network mounts), or where the directory does not exist yet."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock (once; later calls do nothing).

        Raises
        ------
        ValueError
            Naming ``store``, when another fit holds it.
        """
        if self._fd is not None:
            return
        try:
            import fcntl
        except ImportError:  # pragma: no cover (Windows)
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:  # no directory yet: taken again once the store is created
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                return  # a file system without locks (some network mounts): unlocked
            raise ValueError(
                f"store: {os.fspath(self.path)!r} is being written by another fit (in "
                "this or another process); wait until it finishes, then call fit again"
            ) from None
        self._fd = fd
        _HELD_LOCKS.add(fd)

    def release(self) -> None:
        if self._fd is not None:
            _HELD_LOCKS.discard(self._fd)
            os.close(self._fd)
            self._fd = None


def fit_to_store(
    forward_func: Any,
    layer: Any,
    references: Any,
    path: str | os.PathLike,
    append: bool = False,
    batch_size: int = 128,
    additional_forward_args: Any = None,
    attribute_to_layer_input: bool = False,
    device: torch.device | None = None,
    progress: bool = True,
) -> tuple[ReferenceStore, Example, int, bool]:
    """Stream the references' features, predictions and logits (when small, see
    :func:`keep_logits`) into the store at ``path``.

    - no store at ``path``: create one and write every reference;
    - an incomplete store (interrupted fit) and ``append=False``: resume, skipping the
      ``n`` references already written (same reference sequence expected);
    - a complete store and ``append=False``: nothing is recomputed when it holds as many
      rows as ``fit`` reads from the references (a finished fit of the same references;
      a DataLoader's sampler or ``drop_last`` can read fewer than its dataset holds),
      otherwise ``ValueError``;
    - ``append=True``: write all references after the rows already stored; on a store
      whose append was interrupted, resume that append (same references expected);
    - an incomplete store and the other ``append`` than the interrupted call's:
      ``ValueError`` (resuming it would skip or repeat rows).

    The store keeps a fingerprint of the model's weights (:func:`model_fingerprint`) and
    the split layer's name; a store written by a model with other weights, or at another
    layer, is refused in every case (its rows would be mixed with, or stand for, this
    model's at this layer). The store's directory is locked while this call writes
    (:class:`StoreLock`): a second fit of the same store meanwhile, in this or another
    process, is refused with a ``ValueError`` instead of writing into it. Only one batch
    of features is in memory at a time.

    Returns
    -------
    (store, example, start, written)
        The store; the first reference (read and checked also when a finished store is
        reused without running the model); ``start``, the store's row of that first
        reference (0, or with ``append`` the number of rows stored before); and
        ``written``, whether this call wrote that row (not when it resumed past it or
        reused a finished store).
    """
    if not isinstance(append, bool):
        raise TypeError(f"append must be a bool, got {type(append).__name__}")
    recorder = OutputRecorder(forward_func, keep=False)
    n, example, run = feature_batches(
        recorder,
        layer,
        references,
        batch_size,
        additional_forward_args,
        attribute_to_layer_input,
        device,
        progress,
        desc="fit: reference features (store)",
    )
    lock = StoreLock(path)
    try:
        if ReferenceStore.exists(path):
            lock.acquire()
        return _write_store(
            forward_func, layer, recorder, (n, example, run), lock, path, append, references,
            attribute_to_layer_input,
        )  # fmt: skip
    finally:
        lock.release()


def _write_store(
    forward_func: Any,
    layer: Any,
    recorder: OutputRecorder,
    batches: tuple[int | None, Example, Any],
    lock: StoreLock,
    path: str | os.PathLike,
    append: bool,
    references: Any,
    attribute_to_layer_input: bool,
) -> tuple[ReferenceStore, Example, int, bool]:
    """:func:`fit_to_store` after the references' first example was read, under ``lock``
    (taken here once a new store is created)."""
    n, example, run = batches
    store = ReferenceStore.open(path) if ReferenceStore.exists(path) else None
    fingerprint = model_fingerprint(forward_func)
    layer_name = module_name(forward_func, layer)
    skip = start = 0
    if store is not None:
        _check_fingerprint(store, fingerprint, path)
        _check_layer(store, layer_name, path)
        if store.attribute_to_layer_input != attribute_to_layer_input:
            raise ValueError(
                f"store: {os.fspath(path)!r} was fitted with attribute_to_layer_input="
                f"{store.attribute_to_layer_input}"
            )
        since = store.meta.get("append_from")  # the first row of an interrupted append
        if not store.complete and append != (since is not None):
            if append:
                raise ValueError(
                    f"store: {os.fspath(path)!r} holds an interrupted fit ({store.n} rows "
                    "written); resume it first (the same references, append=False), then "
                    "append"
                )
            raise ValueError(
                f"store: {os.fspath(path)!r} holds an interrupted append (rows {since} to "
                f"{store.n}); resume it with the same references and append=True"
            )
        m = rows_read(references, n)
        if store.complete and not append:
            if m is not None and m == store.n:
                return store, example, 0, False
            raise ValueError(
                f"store: {os.fspath(path)!r} already holds a finished fit of {store.n} "
                "references; pass append=True to add these, or use a new path"
            )
        if store.complete:  # append after the stored rows
            start = store.n
        else:  # resume the interrupted fit (from row 0) or append (from its first row)
            start = 0 if since is None else int(since)
            skip = store.n - start
            if m is not None and skip > m:
                what, it = ("", "") if since is None else (" of an interrupted append", " it")
                raise ValueError(
                    f"store: {os.fspath(path)!r} holds {skip} rows{what} but only {m} "
                    f"references were given to resume{it} with"
                )
        if append:
            store.meta["append_from"] = start  # saved with the first rows written
    for rows, preds, layout in run(skip):
        if store is None:
            store = ReferenceStore.create(path, layout, n or 1024, attribute_to_layer_input)
            store.meta["model"] = fingerprint
            store.meta["layer"] = layer_name
            lock.acquire()
        elif layout != store.layout:
            raise ValueError(
                f"references: the layer's output shapes {layout.shapes} differ from the "
                f"store's {store.layout.shapes}"
            )
        store.write(rows.to("cpu", torch.float32), preds, recorder.last)
    if store is None or store.n == 0:
        raise ValueError("references: the reference set is empty")
    store.mark_complete()
    return store, example, start, skip == 0
