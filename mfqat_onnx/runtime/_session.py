"""ONNX Runtime sessions for ``mfqat`` models, with or without the native kernels."""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import onnx
import onnxruntime as ort

from mfqat_onnx._onnx_io import read_model_file
from mfqat_onnx.runtime import _placement
from mfqat_onnx.runtime._build import find_kernel_library

logger = logging.getLogger(__name__)

KernelChoice = Literal["auto", "native", "functions"]
Preference = Literal["speed", "memory"]

_KERNEL_CHOICES = ("auto", "native", "functions")
_PREFERENCES = ("speed", "memory")
# Protobuf cannot serialize a message of 2 GiB or more.
_MAX_PROTO_BYTES = (1 << 31) - 1


class KernelLibraryError(RuntimeError):
    """``kernels="native"`` was requested but the kernel library is missing or does not load."""


@dataclasses.dataclass
class MXSession:
    """An ``onnxruntime.InferenceSession`` plus how it runs the ``mfqat`` operators.

    Attribute access the wrapper does not define (``get_inputs``,
    ``get_outputs``, ``run_with_iobinding`` ...) goes to :attr:`session`.

    Attributes:
        session: The ONNX Runtime session.
        execution_path: ``"native"`` when the kernel library is registered,
            ``"functions"`` when the ``mfqat`` nodes run as their standard-op
            function bodies, ``"plain"`` when the model has no ``mfqat`` node.
        weight_storage: ``"packed"`` when constant weights stay MX-coded in
            memory and are decoded on every run, ``"fp32"`` when ONNX Runtime
            folded them to fp32 initializers at session start.
        folded_weights: Number of constant ``MXDequantize`` nodes routed to
            their function body for folding (``prefer="speed"`` with the
            kernel library).
        kernel_library: Path of the registered library, or None.
        format: Format the model was retargeted to, or None when it runs as stored.
    """

    session: ort.InferenceSession
    execution_path: Literal["native", "functions", "plain"]
    weight_storage: Literal["packed", "fp32"]
    folded_weights: int = 0
    kernel_library: Path | None = None
    format: str | None = None
    _tmpdir: tempfile.TemporaryDirectory | None = dataclasses.field(default=None, repr=False)

    def run(
        self,
        output_names: Sequence[str] | None,
        input_feed: dict[str, Any],
        run_options: ort.RunOptions | None = None,
    ) -> list[Any]:
        """Run the model; same arguments as ``InferenceSession.run``."""
        return self.session.run(output_names, input_feed, run_options)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "session":
            raise AttributeError(name)
        return getattr(self.session, name)


def _load(model: str | os.PathLike[str] | onnx.ModelProto) -> tuple[onnx.ModelProto, str, Path | None]:
    """Return (model proto, label for messages, path it came from)."""
    if isinstance(model, onnx.ModelProto):
        return model, model.graph.name or "<in-memory model>", None
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.exists():
            raise FileNotFoundError(f"model file {str(path)!r} not found")
        return read_model_file(path), str(path), path
    raise TypeError(f"model must be a path or an onnx.ModelProto, got {type(model).__name__}")


def _retarget(model: onnx.ModelProto, target: str) -> onnx.ModelProto:
    try:
        from mfqat_onnx.retarget import retarget_model
    except ImportError as error:
        raise ImportError(
            f"format={target!r} needs mfqat_onnx.retarget, which failed to import: {error}"
        ) from error
    retargeted, report = retarget_model(model, target)
    logger.info(
        "retargeted to %s in memory: %d weights converted (%s)",
        report.target,
        len(report.converted),
        ", ".join(report.methods) or "no change",
    )
    return retargeted


# Session options that already hold the library: registering twice makes
# ONNX Runtime reject the session ("Domain already set in registry").
_REGISTERED: weakref.WeakSet[ort.SessionOptions] = weakref.WeakSet()


def _register(options: ort.SessionOptions, library: Path) -> None:
    if options in _REGISTERED:
        return
    try:
        options.register_custom_ops_library(str(library))
    except Exception as error:  # onnxruntime raises its own pybind exception types
        raise KernelLibraryError(f"registering {library} failed: {error}") from error
    _REGISTERED.add(options)


def _pick_library(kernels: KernelChoice, options: ort.SessionOptions) -> tuple[Path | None, str]:
    """Register the kernel library per ``kernels``; return (library or None, reason when None)."""
    if kernels == "functions":
        return None, 'kernels="functions" was requested'
    library = find_kernel_library()
    if library is None:
        if kernels == "native":
            raise KernelLibraryError(
                'kernels="native" was requested but the kernel library is not built; build it with '
                "mfqat_onnx.runtime.build_kernels() or `python -m mfqat_onnx.runtime --build-kernels`, "
                'or pass kernels="auto" to fall back to the function bodies'
            )
        return None, "the kernel library is not built (see mfqat_onnx.runtime.build_kernels())"
    try:
        _register(options, library)
    except KernelLibraryError as error:
        if kernels == "native":
            raise
        return None, str(error)
    return library, ""


def _session_source(
    model: onnx.ModelProto, path: Path | None, modified: bool
) -> tuple[str | bytes, tempfile.TemporaryDirectory | None]:
    if path is not None and not modified:
        return str(path), None
    if model.ByteSize() <= _MAX_PROTO_BYTES:
        return model.SerializeToString(), None
    # Too large for one protobuf message: save with external data and let
    # ONNX Runtime read the folder, which lives as long as the session.
    tmpdir = tempfile.TemporaryDirectory(prefix="mfqat-session-")
    target = Path(tmpdir.name) / "model.onnx"
    onnx.save(model, str(target), save_as_external_data=True, location="model.onnx.data")
    return str(target), tmpdir


def open_session(
    model: str | os.PathLike[str] | onnx.ModelProto,
    *,
    format: str | None = None,
    kernels: KernelChoice = "auto",
    prefer: Preference = "speed",
    providers: Sequence[str] | None = None,
    session_options: ort.SessionOptions | None = None,
) -> MXSession:
    """Open an ONNX Runtime session for an ``mfqat`` model.

    With the kernel library (``kernels="auto"`` finds it, ``"native"``
    requires it) the ``mfqat`` operators run as native kernels; without it
    they run as their standard-op function bodies, attached here when the file
    lacks them. ``prefer`` picks how constant weights are held:

    - ``"speed"``: ONNX Runtime folds each weight's function body to an fp32
      initializer at session start (fp32 speed and memory); activation
      quantizers still use the kernels.
    - ``"memory"``: weights stay MX-packed and the kernel decodes them on every
      run. Without the library this is not possible, and the log says so.

    Args:
        model: Path of an ONNX file or a ModelProto (not modified).
        format: Retarget the model to this MX format in memory first (for
            example ``"mxfp4"``); None runs it as stored.
        kernels: ``"auto"``, ``"native"`` or ``"functions"``.
        prefer: ``"speed"`` or ``"memory"``.
        providers: ONNX Runtime execution providers; CPU by default.
        session_options: Options to use; the kernel library is registered into
            them, so pass a fresh object per call.

    Returns:
        An :class:`MXSession` whose ``execution_path`` and ``weight_storage``
        tell what was used.

    Raises:
        ValueError: Bad ``kernels``/``prefer`` value, or the model uses an
            ``mfqat`` domain version or operator this runtime does not implement.
        KernelLibraryError: ``kernels="native"`` and the library is missing or fails to load.
        FileNotFoundError: ``model`` is a path that does not exist.
        mfqat_onnx._onnx_io.ModelFileError: ``model`` is a folder, not an ONNX
            file, truncated, or has external data that is missing or leaves its folder.
    """
    if kernels not in _KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {', '.join(_KERNEL_CHOICES)}, got {kernels!r}")
    if prefer not in _PREFERENCES:
        raise ValueError(f"prefer must be one of {', '.join(_PREFERENCES)}, got {prefer!r}")

    proto, label, path = _load(model)
    modified = False
    if format is not None:
        proto = _retarget(proto, format)
        modified = True
    _placement.check_domain(proto)
    uses_mx = bool(_placement.mx_op_types(proto))
    if not modified and path is None:
        # The placement steps edit the graph; never touch the caller's proto.
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        proto = copy

    options = session_options if session_options is not None else ort.SessionOptions()
    library, reason = _pick_library(kernels, options)

    folded = 0
    if library is None:
        modified |= _placement.ensure_functions(proto)
        execution_path, storage = "functions", "fp32"
        if uses_mx:
            memory_note = ' (prefer="memory" needs the kernel library)' if prefer == "memory" else ""
            log = logger.warning if kernels == "auto" else logger.info
            log(
                "mfqat: %s runs through the ONNX function bodies because %s; constant weights are folded "
                "to fp32 at session start%s",
                label,
                reason,
                memory_note,
            )
    else:
        execution_path, storage = "native", "packed"
        storage_note = "weights stay packed and are decoded on every run"
        if prefer == "speed":
            try:
                folded = _placement.route_constant_weights(proto)
            except (ValueError, ImportError) as error:
                # Without a usable function body the weights can only stay packed.
                storage_note += f" (cannot fold them: {error})"
            modified |= folded > 0
            storage = "fp32" if folded else "packed"
            if folded:
                storage_note = f"{folded} constant weights folded to fp32 (prefer='speed')"
        if uses_mx:
            logger.info("mfqat: %s runs on the native kernels (%s); %s", label, library, storage_note)

    if not uses_mx:
        # A plain model: nothing runs on our kernels or bodies, and its weights are whatever the file holds.
        execution_path, storage = "plain", "fp32"

    source, tmpdir = _session_source(proto, path, modified)
    session = ort.InferenceSession(
        source, options, providers=list(providers) if providers else ["CPUExecutionProvider"]
    )
    return MXSession(
        session=session,
        execution_path=execution_path,
        weight_storage=storage,
        folded_weights=folded,
        kernel_library=library,
        format=format,
        _tmpdir=tmpdir,
    )
