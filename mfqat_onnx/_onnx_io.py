"""Safe loading and saving of ONNX model files.

Loading raises a separate exception class for each kind of bad input: a path
that is not a file, bytes that are not an ONNX model, a truncated or corrupt
file, and external data that is missing, out of bounds or outside the model's
folder. It also rejects opsets this package cannot read (a standard opset
below 21, or an ``mfqat`` opset other than version 1). Every external data
location is checked before any external byte is read.

Saving replaces an existing file only with ``force`` and never writes over a
protected path (the input model and its data). It writes atomically: the
model, and its external data when the protobuf would pass the 2 GiB limit, are
staged in a temporary folder beside the output, checked with
``onnx.checker.check_model(full_check=True)``, then moved in place with
``os.replace``. On any failure the temporary folder is removed, so nothing is
left behind.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

import onnx
from google.protobuf.message import DecodeError, EncodeError

from mfqat_onnx.onnx_ops import DOMAIN, DOMAIN_VERSION

__all__ = [
    "ANCHOR_FORMAT_KEY",
    "DERIVED_FROM_KEY",
    "MIN_STANDARD_OPSET",
    "PRODUCER_VERSION_KEY",
    "SCALE_RULE_KEY",
    "WEIGHTS_KEY",
    "check_opsets",
    "check_output_path",
    "find_external_tensors",
    "CorruptModelError",
    "ExternalDataError",
    "ModelCheckError",
    "ModelFileError",
    "ModelNotFoundError",
    "NotAnOnnxModelError",
    "OpsetError",
    "OutputExistsError",
    "UnsafeExternalDataError",
    "load_model",
    "load_model_with_files",
    "save_model",
]

logger = logging.getLogger(__name__)

MIN_STANDARD_OPSET = 21

# Model metadata keys (``metadata_props``) that the exporter and retarget write.
ANCHOR_FORMAT_KEY = "mfqat.anchor_format"
SCALE_RULE_KEY = "mfqat.scale_rule"
PRODUCER_VERSION_KEY = "mfqat.producer_version"
WEIGHTS_KEY = "mfqat.weights"
DERIVED_FROM_KEY = "mfqat.derived_from"

# Protobuf cannot serialize a message of 2 GiB or more. The margin covers the
# bytes that external data references add.
_MAX_PROTOBUF_BYTES = 2**31 - 1 - 64 * 2**20
_EXTERNAL_SIZE_THRESHOLD = 1024
_EXTERNAL_ALIGNMENT = 4096
# Protobuf serializers write known fields in field-number order, so a model
# file written by onnx starts with the tag of ``ir_version`` (field 1, varint).
# Only the wording of the parse error depends on this.
_IR_VERSION_TAG = 0x08


class ModelFileError(ValueError):
    """A model file cannot be read or written safely."""


class ModelNotFoundError(ModelFileError):
    """The model path does not exist or is not a regular file."""


class NotAnOnnxModelError(ModelFileError):
    """The file does not contain an ONNX ``ModelProto``."""


class CorruptModelError(ModelFileError):
    """The file starts like an ONNX model but is truncated or damaged."""


class ExternalDataError(ModelFileError):
    """An external data file is missing, unreadable or shorter than a tensor needs."""


class UnsafeExternalDataError(ExternalDataError):
    """An external data location is absolute or resolves outside the model's folder."""


class OpsetError(ModelFileError):
    """The model's opset imports are outside what this package reads."""


class OutputExistsError(ModelFileError):
    """The output path exists (and ``force`` is off) or is a protected input path."""


class ModelCheckError(ModelFileError):
    """The model to be written fails ``onnx.checker.check_model(full_check=True)``."""


# ---------------------------------------------------------------------------
# Loading


def load_model(
    path: str | os.PathLike[str], *, load_external_data: bool = True, require_mfqat: bool = True
) -> onnx.ModelProto:
    """Load an ONNX model file after checking that it is safe and readable.

    Args:
        path: Path of the ``.onnx`` file.
        load_external_data: Whether to read external tensor data into the model.
            The locations are validated either way.
        require_mfqat: Whether the model must import the ``mfqat`` domain.

    Returns:
        The model, with external data loaded when ``load_external_data`` is set.

    Raises:
        ModelNotFoundError: ``path`` does not exist or is not a regular file.
        NotAnOnnxModelError: The bytes are not an ONNX model.
        CorruptModelError: The file is truncated or fails the ONNX checker.
        UnsafeExternalDataError: An external data location is absolute or escapes
            the model's folder (through ``..`` or a symbolic link).
        ExternalDataError: External data is missing or shorter than declared.
        OpsetError: Standard opset below 21, or ``mfqat`` opset not version 1.
    """
    model, _ = load_model_with_files(path, load_external_data=load_external_data, require_mfqat=require_mfqat)
    return model


def load_model_with_files(
    path: str | os.PathLike[str], *, load_external_data: bool = True, require_mfqat: bool = True
) -> tuple[onnx.ModelProto, tuple[Path, ...]]:
    """Load a model like `load_model` and also return every file it was read from.

    The files (the model itself first, then each external data file, all
    resolved) are what a writer must protect so that it never replaces its
    own input.

    Args:
        path: Path of the ``.onnx`` file.
        load_external_data: Whether to read external tensor data into the model.
        require_mfqat: Whether the model must import the ``mfqat`` domain.

    Returns:
        The model and the resolved paths of the files it came from.

    Raises:
        ModelFileError: A subclass naming the problem, as listed in `load_model`.
    """
    model_path = _existing_model_path(path)

    model, data = _parse_model_file(model_path)
    check_opsets(model, where=repr(str(model_path)), require_mfqat=require_mfqat)
    _check_function_bodies(model, model_path)

    external = _checked_external_tensors(model, model_path)
    # With external data the checker needs the path, to find the data files.
    _run_checker(model_path, None if external else data)
    del data
    if load_external_data:
        _read_external_tensors(external, model_path)

    data_files = tuple(dict.fromkeys(data_path for _, data_path in external))
    logger.debug("loaded %s (%d external data files)", model_path, len(data_files))
    return model, (model_path.resolve(), *data_files)


def read_model_file(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Parse a model file and read its external data, with the specific errors of `load_model`.

    Unlike `load_model` it checks no opsets, function bodies or ONNX checker
    rules, so it also reads plain models of any opset.

    Raises:
        ModelNotFoundError: ``path`` does not exist or is not a regular file.
        NotAnOnnxModelError: The bytes are not an ONNX model.
        CorruptModelError: The file is truncated.
        UnsafeExternalDataError: An external data location leaves the model's folder.
        ExternalDataError: External data is missing or shorter than declared.
    """
    model_path = _existing_model_path(path)
    model, _ = _parse_model_file(model_path)
    _read_external_tensors(_checked_external_tensors(model, model_path), model_path)
    return model


def _existing_model_path(path: str | os.PathLike[str]) -> Path:
    model_path = Path(path)
    if not model_path.exists():
        raise ModelNotFoundError(f"model file not found: {str(model_path)!r}")
    if not model_path.is_file():
        raise ModelNotFoundError(f"model path {str(model_path)!r} is not a regular file; give the .onnx file")
    return model_path


def _checked_external_tensors(
    model: onnx.ModelProto, model_path: Path
) -> list[tuple[onnx.TensorProto, Path]]:
    """Return each tensor with external data and its validated data file."""
    base_dir = model_path.resolve().parent
    return [(tensor, _resolve_external_data(tensor, base_dir, model_path)) for tensor in find_external_tensors(model)]


def _read_external_tensors(external: list[tuple[onnx.TensorProto, Path]], model_path: Path) -> None:
    base_dir = model_path.resolve().parent
    for tensor, _ in external:
        onnx.external_data_helper.load_external_data_for_tensor(tensor, str(base_dir))


def _parse_model_file(model_path: Path) -> tuple[onnx.ModelProto, bytes]:
    """Parse the protobuf, telling a foreign file from a damaged ONNX file; return the model and the file's bytes."""
    data = model_path.read_bytes()
    if not data:
        raise NotAnOnnxModelError(f"{str(model_path)!r} is empty, not an ONNX model")
    looks_like_onnx = data[0] == _IR_VERSION_TAG
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except DecodeError as exc:
        if looks_like_onnx:
            raise CorruptModelError(
                f"{str(model_path)!r} is truncated or corrupt: protobuf parsing failed ({exc}); "
                "export or copy the model again"
            ) from None
        raise NotAnOnnxModelError(
            f"{str(model_path)!r} is not an ONNX model file (protobuf parsing failed: {exc})"
        ) from None

    if model.ir_version == 0 or not model.HasField("graph"):
        if looks_like_onnx:
            raise CorruptModelError(
                f"{str(model_path)!r} is truncated or corrupt: it has an ir_version but no graph"
            )
        raise NotAnOnnxModelError(
            f"{str(model_path)!r} is not an ONNX model file (no ir_version or graph found)"
        )
    return model, data


def check_opsets(model: onnx.ModelProto, *, where: str = "the model", require_mfqat: bool = True) -> None:
    """Check the standard and ``mfqat`` opset versions against what this package reads.

    Args:
        model: The model to check.
        where: How error messages name the model, such as its quoted path.
        require_mfqat: Whether the ``mfqat`` domain must be imported.

    Raises:
        OpsetError: Standard opset missing or below 21, or ``mfqat`` opset
            missing (when required) or not version 1.
    """
    versions = {entry.domain or "ai.onnx": entry.version for entry in model.opset_import}
    standard = versions.get("ai.onnx")
    if standard is None:
        raise OpsetError(
            f"{where} has no opset import for the standard ONNX domain; the file may be truncated"
        )
    if standard < MIN_STANDARD_OPSET:
        raise OpsetError(
            f"{where} uses standard opset {standard}, expected {MIN_STANDARD_OPSET} or newer; "
            f"re-export the model with opset {MIN_STANDARD_OPSET} or newer"
        )

    mfqat = versions.get(DOMAIN)
    if mfqat is None:
        if require_mfqat:
            raise OpsetError(
                f"{where} has no {DOMAIN!r} opset import, so it was not written by "
                "mfqat_onnx.export; export the model with mfqat_onnx first"
            )
        return
    if mfqat != DOMAIN_VERSION:
        raise OpsetError(
            f"{where} uses {DOMAIN!r} opset version {mfqat}, but this version of "
            f"mfqat_onnx reads version {DOMAIN_VERSION} only; upgrade mfqat_onnx"
        )


def _iter_graph_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from _iter_graph_nodes(attribute.g)
            for subgraph in attribute.graphs:
                yield from _iter_graph_nodes(subgraph)


def _check_function_bodies(model: onnx.ModelProto, model_path: Path) -> None:
    """Require a model-local function for every ``mfqat`` operator the graph uses."""
    bodies = {(function.domain, function.name) for function in model.functions}
    for node in _iter_graph_nodes(model.graph):
        if node.domain == DOMAIN and (DOMAIN, node.op_type) not in bodies:
            raise CorruptModelError(
                f"{str(model_path)!r} uses {DOMAIN}::{node.op_type} but carries no function body for it; "
                "files written by mfqat_onnx always do, so the file is truncated or was edited. "
                "Export the model again"
            )


def find_external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Return the tensors whose data still lives in an external file."""
    return [tensor for tensor in _iter_tensors(model) if tensor.data_location == onnx.TensorProto.EXTERNAL]


def _run_checker(model_path: Path, data: bytes | None) -> None:
    """Run the basic ONNX checker on the file's bytes, or on the file when ``data`` is None.

    It catches damage that still parses. Both forms spare serializing the
    parsed model again.
    """
    try:
        onnx.checker.check_model(str(model_path) if data is None else data)
    except onnx.checker.ValidationError as exc:
        raise CorruptModelError(
            f"{str(model_path)!r} is corrupt: the ONNX checker rejects it ({exc})"
        ) from None


def _iter_graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    yield from _iter_node_tensors(graph.node)


def _iter_node_tensors(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.TensorProto]:
    for node in nodes:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _iter_graph_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _iter_graph_tensors(subgraph)


def _iter_initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Yield the initializers of ``graph`` and of its subgraphs."""
    yield from graph.initializer
    for node in _iter_graph_nodes(graph):
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from attribute.g.initializer
            for subgraph in attribute.graphs:
                yield from subgraph.initializer


def _iter_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Yield every tensor of the model: initializers, attributes, subgraphs, functions."""
    yield from _iter_graph_tensors(model.graph)
    for function in model.functions:
        yield from _iter_node_tensors(function.node)


def _tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """Return the bytes a tensor's dims and type need (0 for types without a numpy itemsize)."""
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return 0
    return math.prod(tensor.dims) * itemsize


def _external_data_fields(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _resolve_external_data(tensor: onnx.TensorProto, base_dir: Path, model_path: Path) -> Path:
    """Validate one tensor's external data reference and return its resolved file.

    The location must be relative, free of ``..`` components, must resolve
    (following symbolic links in its folders) inside ``base_dir``, and must name
    a regular file, not a link, long enough for ``offset + length``.
    """
    fields = _external_data_fields(tensor)
    location = fields.get("location", "")
    where = f"tensor {tensor.name!r} of {str(model_path)!r}"
    if not location:
        raise ExternalDataError(f"{where} is marked as external data but has no location")

    windows = PureWindowsPath(location)
    is_absolute = PurePosixPath(location).is_absolute() or windows.is_absolute() or bool(windows.drive)
    if "\0" in location or is_absolute or location.startswith(("/", "\\")):
        raise UnsafeExternalDataError(
            f"{where} has an absolute external data location {location!r}; "
            "locations must be relative to the model's folder"
        )
    if ".." in windows.parts:
        raise UnsafeExternalDataError(
            f"{where} has external data location {location!r} with a '..' component, "
            "which points outside the model's folder"
        )

    data_path = (base_dir / location).resolve()
    if not data_path.is_relative_to(base_dir):
        raise UnsafeExternalDataError(
            f"{where} has external data location {location!r} that resolves to {str(data_path)!r}, "
            f"outside the model's folder {str(base_dir)!r} (through a symbolic link)"
        )
    if (base_dir / location).is_symlink():
        # onnx.load (1.23) rejects links as well, and matching it keeps the two loaders consistent.
        raise UnsafeExternalDataError(
            f"{where} has external data location {location!r}, which is a symbolic link; "
            "replace it with the file itself"
        )
    if not data_path.exists():
        raise ExternalDataError(
            f"external data file {location!r} of {where} not found in {str(base_dir)!r}; "
            "copy it next to the model"
        )
    if not data_path.is_file():
        raise ExternalDataError(f"external data path {location!r} of {where} is not a regular file")

    try:
        offset = int(fields.get("offset", "0"))
        length = int(fields["length"]) if "length" in fields else None
    except ValueError:
        raise ExternalDataError(
            f"{where} has a non-integer external data offset or length: {fields}"
        ) from None
    if length is None:
        length = _tensor_nbytes(tensor)
    file_size = data_path.stat().st_size
    end = offset + length
    if offset < 0 or length < 0 or end > file_size:
        raise ExternalDataError(
            f"{where} needs bytes {offset}..{end} of {location!r}, but the file has {file_size} bytes; "
            "the external data file is truncated or does not belong to this model"
        )
    return data_path


# ---------------------------------------------------------------------------
# Saving


def check_output_path(
    path: str | os.PathLike[str],
    *,
    force: bool = False,
    protected: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Check that `save_model` may write ``path``, before any expensive work.

    Returns:
        ``path`` as a `Path`.

    Raises:
        ModelFileError: The folder is missing or ``path`` is a folder.
        OutputExistsError: ``path`` exists and ``force`` is off, or it is protected.
    """
    out_path = Path(path)
    if not out_path.parent.is_dir():
        raise ModelFileError(f"output folder {str(out_path.parent)!r} does not exist; create it first")
    _check_writable(out_path, [Path(p) for p in protected], force=force)
    return out_path


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    force: bool = False,
    protected: Iterable[str | os.PathLike[str]] = (),
    external_data: bool | None = None,
) -> tuple[Path, ...]:
    """Write a model atomically after checking it with the full ONNX checker.

    The model (and its external data file, ``<name>.data`` beside it) is staged
    in a temporary folder next to ``path``, checked with
    ``onnx.checker.check_model(full_check=True)``, then moved into place with
    ``os.replace``, the data file first. ``model`` itself is left as it was.

    Args:
        model: The model, with all tensor data in memory.
        path: Output path of the ``.onnx`` file; its folder must exist.
        force: Replace existing output files (never a protected path).
        protected: Paths that must never be written, such as the input model and
            its external data files. Compared after resolving symbolic links.
        external_data: Store tensors of 1 KiB or more in ``<name>.data``. ``None``
            chooses external data only when the protobuf would pass the 2 GiB limit.

    Returns:
        The files written: the model, then its external data file if any.

    Raises:
        OutputExistsError: An output file exists and ``force`` is off, or an
            output path is protected.
        ModelFileError: The output folder does not exist, or the model is too
            large for one protobuf while ``external_data`` is False.
        ModelCheckError: The staged file fails the ONNX checker.
    """
    protected_paths = [Path(p) for p in protected]
    out_path = check_output_path(path, force=force, protected=protected_paths)
    folder = out_path.parent

    data = None if external_data else _serialize_within_limit(model)
    if external_data is None:
        external_data = data is None
    elif not external_data and data is None:
        raise ModelFileError(
            "the model is larger than one protobuf can hold (2 GiB); save it with external data"
        )
    data_name = out_path.name + ".data"
    written = [out_path]
    if external_data:
        written.append(check_output_path(folder / data_name, force=force, protected=protected_paths))

    staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=folder))
    try:
        staged_model = staging / out_path.name
        if data is None:
            _write_with_external_data(model, staged_model, data_name)
        else:
            _write_bytes(staged_model, data)
        try:
            # In memory when possible: the checker would otherwise read the file back.
            onnx.checker.check_model(str(staged_model) if data is None else data, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise ModelCheckError(
                f"cannot write {str(out_path)!r}: the ONNX checker rejects the model ({exc})"
            ) from None
        if external_data:
            os.replace(staging / data_name, folder / data_name)
        os.replace(staged_model, out_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote %s", ", ".join(str(p) for p in written))
    return tuple(written)


def _serialize_within_limit(model: onnx.ModelProto) -> bytes | None:
    """Serialize ``model``, or return None when it is too large for one protobuf.

    Serializing once and measuring the bytes replaces ``ByteSize()``, which
    serializes the whole message too in the upb protobuf backend.
    """
    if sum(len(tensor.raw_data) for tensor in _iter_initializers(model.graph)) > _MAX_PROTOBUF_BYTES:
        return None
    try:
        data = model.SerializeToString()
    except (ValueError, EncodeError):
        return None
    return data if len(data) <= _MAX_PROTOBUF_BYTES else None


def same_file(a: Path, b: Path) -> bool:
    """Tell whether two paths name the same file, after resolving links."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_writable(target: Path, protected: list[Path], *, force: bool) -> None:
    if target.is_dir():
        raise ModelFileError(f"output path {str(target)!r} is a folder; give a file name")
    for guarded in protected:
        if same_file(target, guarded):
            raise OutputExistsError(
                f"cannot write {str(target)!r}: it is the input file {str(guarded)!r}; "
                "choose another output path"
            )
    if os.path.lexists(target) and not force:
        raise OutputExistsError(
            f"output file {str(target)!r} already exists; pass --force (force=True from Python) to replace it"
        )


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _write_with_external_data(model: onnx.ModelProto, model_path: Path, data_name: str) -> None:
    """Write initializers above the threshold to ``data_name`` and the rest to ``model_path``.

    Attribute tensors (``Constant`` values, function bodies) stay inline, as
    ``onnx.save_model`` does by default. The tensors are switched to external references only while the model is
    serialized; their bytes are put back afterwards so the caller's model is
    unchanged.
    """
    moved: list[tuple[onnx.TensorProto, bytes, bool]] = []
    try:
        with open(model_path.parent / data_name, "wb") as data_file:
            for tensor in _iter_initializers(model.graph):
                if tensor.data_location == onnx.TensorProto.EXTERNAL:
                    raise ModelFileError(
                        f"tensor {tensor.name!r} still refers to external data; load it into memory first"
                    )
                if not tensor.HasField("raw_data") or len(tensor.raw_data) < _EXTERNAL_SIZE_THRESHOLD:
                    continue
                raw = tensor.raw_data
                offset = -data_file.tell() % _EXTERNAL_ALIGNMENT + data_file.tell()
                data_file.seek(offset)
                data_file.write(raw)
                moved.append((tensor, raw, tensor.HasField("data_location")))
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (
                    ("location", data_name),
                    ("offset", str(offset)),
                    ("length", str(len(raw))),
                ):
                    entry = tensor.external_data.add()
                    entry.key = key
                    entry.value = value
            data_file.flush()
            os.fsync(data_file.fileno())

        if model.ByteSize() > _MAX_PROTOBUF_BYTES:
            raise ModelFileError(
                "the model is over 2 GiB even with its raw tensor data stored externally; "
                "store large tensors as raw_data"
            )
        _write_bytes(model_path, model.SerializeToString())
    finally:
        for tensor, raw, had_location in moved:
            del tensor.external_data[:]
            if had_location:
                tensor.data_location = onnx.TensorProto.DEFAULT
            else:
                tensor.ClearField("data_location")
            tensor.raw_data = raw
