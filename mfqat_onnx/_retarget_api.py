"""Retarget an anchor model to a lower MX format, in memory or file to file.

`retarget_model` checks the ``mfqat`` metadata and the requested formats,
rewrites the MX weights with Slice-and-Scale (see `_retarget_rewrite`) and
updates the metadata: ``mfqat.weights`` gets each weight's new format,
``mfqat.derived_from`` the anchor format, ``mfqat.anchor_format`` stays.
`retarget_file` wraps it with the safe loading and atomic saving of
`_onnx_io`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

import onnx
import onnx_ir as ir

import mfqat_onnx
from mfqat_onnx import _onnx_io, onnx_ops
from mfqat_onnx._onnx_io import (
    ANCHOR_FORMAT_KEY,
    DERIVED_FROM_KEY,
    PRODUCER_VERSION_KEY,
    SCALE_RULE_KEY,
    WEIGHTS_KEY,
)
from mfqat_onnx._retarget_report import (
    AnchorMetadataError,
    RetargetError,
    RetargetReport,
    SkippedLayer,
    UnknownTargetError,
)
from mfqat_onnx._retarget_rewrite import (
    CONVERTED_SCALE_RULE,
    DEFAULT_SCALE_RULE,
    GraphSites,
    convert_weights,
    find_sites,
    plan_targets,
    resolve_target,
    retarget_activations,
)
from mfqat_onnx.formats import MXFormat, get_format, list_formats

logger = logging.getLogger(__name__)


def anchor_format_of(model: onnx.ModelProto) -> MXFormat:
    """Return the format recorded in the model's ``mfqat.anchor_format`` metadata.

    Raises:
        AnchorMetadataError: The key is missing or names no known format.
    """
    return _anchor_format({prop.key: prop.value for prop in model.metadata_props})


def _anchor_format(metadata: Mapping[str, str]) -> MXFormat:
    name = metadata.get(ANCHOR_FORMAT_KEY)
    if name is None:
        raise AnchorMetadataError(
            f"the model has no {ANCHOR_FORMAT_KEY!r} metadata, so it was not written by mfqat_onnx.export; "
            "export it with mfqat_onnx first"
        )
    try:
        return get_format(name)
    except ValueError as exc:
        raise AnchorMetadataError(f"metadata {ANCHOR_FORMAT_KEY!r} is invalid: {exc}") from None


def weights_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """Parse ``mfqat.weights`` into weight name -> canonical format id."""
    text = metadata.get(WEIGHTS_KEY)
    if text is None:
        return {}
    try:
        weights = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AnchorMetadataError(f"metadata {WEIGHTS_KEY!r} is not valid JSON: {exc}") from None
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weights.items()
    ):
        raise AnchorMetadataError(
            f"metadata {WEIGHTS_KEY!r} must be a JSON object mapping weight names to format names, "
            f"got {text[:200]!r}"
        )
    try:
        return {name: get_format(fmt).name for name, fmt in weights.items()}
    except ValueError as exc:
        raise AnchorMetadataError(f"metadata {WEIGHTS_KEY!r} names an invalid format: {exc}") from None


def _reconcile_weights(weights: dict[str, str], sites: GraphSites) -> list[SkippedLayer]:
    """Compare ``mfqat.weights`` with the graph; the node attributes win where they disagree."""
    skipped = []
    all_weights = sites.weights + sites.kept_weights
    found = {site.name for site in all_weights}
    for name in weights:
        if name not in found:
            skipped.append(
                SkippedLayer(name, f"listed in {WEIGHTS_KEY} but no MX weight of that name in the graph")
            )
    for site in all_weights:
        recorded = weights.get(site.name)
        if recorded is not None and recorded != site.fmt.name:
            logger.warning(
                "%s: metadata records %s but the MXDequantize node decodes %s; using the node",
                site.name,
                recorded,
                site.fmt.name,
            )
    return skipped


def _update_metadata(
    model: ir.Model, weights: dict[str, str], sites: GraphSites, anchor: MXFormat, *, changed: bool
) -> None:
    if not changed:
        return
    all_weights = sites.weights + sites.kept_weights
    props = model.metadata_props
    weights = {**weights, **{site.name: site.fmt.name for site in all_weights}}
    props[WEIGHTS_KEY] = json.dumps(weights, sort_keys=True)
    if any(fmt != anchor.name for fmt in weights.values()):
        props[DERIVED_FROM_KEY] = anchor.name
    rules = {
        node.attributes.get_string("scale_rule", DEFAULT_SCALE_RULE)
        for site in all_weights
        for node in site.nodes
    }
    # One key describes the whole file, so it changes only when every weight agrees.
    if rules == {CONVERTED_SCALE_RULE}:
        props[SCALE_RULE_KEY] = CONVERTED_SCALE_RULE
    props[PRODUCER_VERSION_KEY] = mfqat_onnx.__version__


def retarget_model(
    model: onnx.ModelProto,
    target: str,
    *,
    layers: Mapping[str, str] | None = None,
    activations: str | None = None,
    allow_requantize_lowbit: bool = False,
    progress: bool = False,
) -> tuple[onnx.ModelProto, RetargetReport]:
    """Convert the MX weights of an anchor model to ``target``, in memory.

    Within the anchor's family the codes are Slice-and-Scaled; across families
    (MXFP8 to MXINT4, ...) they are decoded and re-quantized, which the report
    records as ``"requantize"``. The input model is not modified.

    Args:
        model: An anchor model (or a derived one, see ``allow_requantize_lowbit``)
            with its tensor data in memory.
        target: Format for every weight that no ``layers`` pattern matches; the
            stored format itself gives an unchanged copy.
        layers: Glob pattern on weight names to format, for mixed precision. The
            first matching pattern wins; a pattern that matches nothing is an error.
        activations: Format for the activation quantizers; ``None`` keeps theirs.
        allow_requantize_lowbit: Convert weights that are no longer in the anchor
            format (a derived file). Rounding twice loses accuracy.
        progress: Show a progress bar over the layers.

    Returns:
        The new model and the report of what changed and what was skipped.

    Raises:
        TypeError: ``model`` is not a ``ModelProto``.
        OpsetError: The model's opsets are not ones this package reads.
        UnknownTargetError: A format name is unknown; the message lists valid names.
        PrecisionError: A target has more bits than a weight's stored format.
        DerivedSourceError: A weight was already derived from the anchor.
        AnchorMetadataError: ``mfqat`` metadata is missing or the MX nodes are inconsistent.
        RetargetError: Tensor data is external, a layer pattern matches nothing,
            or ``activations`` is given for a model without activation quantizers.
    """
    start = time.perf_counter()
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"model must be an onnx.ModelProto, got {type(model).__name__}")
    _onnx_io.check_opsets(model)
    external = _onnx_io.find_external_tensors(model)
    if external:
        raise RetargetError(
            f"tensor {external[0].name!r} keeps its data in an external file; load the model with "
            "load_model() or onnx.load(..., load_external_data=True) first"
        )

    # Validate metadata and format names before the copy and the numerics.
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    anchor = _anchor_format(metadata)
    weights_meta = weights_metadata(metadata)
    target_fmt = resolve_target(target, anchor)
    activation_fmt = _resolve_activation_format(activations)

    ir_model = ir.serde.deserialize_model(model)
    sites = find_sites(ir_model)
    skipped = sites.skipped + _reconcile_weights(weights_meta, sites)
    plan = plan_targets(
        sites.weights, target_fmt, layers, anchor, allow_requantize_lowbit=allow_requantize_lowbit
    )
    if activation_fmt is not None and not sites.activations:
        raise RetargetError(
            "the model has no activation quantizers (MXQuantize -> MXDequantize pairs); drop --activations"
        )

    all_weights = sites.weights + sites.kept_weights
    report = RetargetReport(
        anchor_format=anchor.name, target=target_fmt.name, skipped=skipped, layer_count=len(all_weights)
    )
    report.weight_bytes_before = sum(site.nbytes for site in all_weights)
    report.skipped += [
        SkippedLayer(site.name, f"already in {site.fmt.name}")
        for site, fmt in zip(sites.weights, plan, strict=True)
        if fmt.name == site.fmt.name
    ]
    report.converted = convert_weights(sites.weights, plan, progress=progress)
    if activation_fmt is None:
        report.skipped += [
            SkippedLayer(
                site.name, f"activation quantizer kept in {site.fmt.name} (no activation format given)"
            )
            for site in sites.activations
        ]
    else:
        report.activations, activation_skips = retarget_activations(sites.activations, activation_fmt)
        report.skipped += activation_skips
    report.weight_bytes_after = sum(site.nbytes for site in all_weights)

    changed = bool(report.converted or report.activations)
    _update_metadata(ir_model, weights_meta, sites, anchor, changed=changed)
    if changed:
        # The bodies carry the tables of the formats in the file, so new formats need new bodies.
        onnx_ops.attach_functions(ir_model)
    result = ir.serde.serialize_model(ir_model)
    report.seconds = time.perf_counter() - start
    logger.info(
        "retargeted %d of %d weights to %s (%s) in %.2f s",
        len(report.converted),
        report.layer_count,
        target_fmt.name,
        ", ".join(report.methods) or "no change",
        report.seconds,
    )
    return result, report


def _resolve_activation_format(name: str | None) -> MXFormat | None:
    if name is None:
        return None
    try:
        return get_format(name)
    except ValueError:
        raise UnknownTargetError(
            f"unknown activation format {name!r}; valid names are: {', '.join(list_formats())}"
        ) from None


def default_output_path(path: str | os.PathLike[str], target: str) -> Path:
    """Return ``<stem>.<target>.onnx`` beside ``path`` (``model.onnx`` -> ``model.mxfp4.onnx``).

    A format suffix already in the name is replaced rather than stacked, so
    ``digits.mxint8.onnx`` becomes ``digits.mxint4.onnx``.
    """
    path = Path(path)
    stem = path.name[: -len(".onnx")] if path.name.lower().endswith(".onnx") else path.name
    base, _, suffix = stem.rpartition(".")
    if base and suffix.lower() in list_formats():
        stem = base
    return path.with_name(f"{stem}.{target.strip().lower()}.onnx")


def retarget_file(
    path: str | os.PathLike[str],
    target: str,
    output: str | os.PathLike[str] | None = None,
    *,
    force: bool = False,
    layers: Mapping[str, str] | None = None,
    activations: str | None = None,
    allow_requantize_lowbit: bool = False,
    progress: bool = False,
) -> tuple[Path, RetargetReport]:
    """Retarget an anchor file and write the result atomically.

    Args:
        path: The anchor ``.onnx`` file.
        target: Target format, as in `retarget_model`.
        output: Output path; default ``<stem>.<target>.onnx`` beside ``path``.
        force: Replace an existing output file. The input is never replaced.
        layers: Glob pattern to format, as in `retarget_model`.
        activations: Activation format, as in `retarget_model`.
        allow_requantize_lowbit: As in `retarget_model`.
        progress: Show a progress bar over the layers.

    Returns:
        The path written and the rewrite report.

    Raises:
        ModelFileError: The input cannot be loaded safely or the output cannot
            be written (see `mfqat_onnx._onnx_io`).
        RetargetError: The conversion is not allowed, as in `retarget_model`.
    """
    in_path = Path(path)
    # The default output name contains the target, so check the name before building it.
    resolve_target(target)
    out_path = Path(output) if output is not None else default_output_path(in_path, target)
    if output is None and _onnx_io.same_file(out_path, in_path):
        raise RetargetError(
            f"{str(in_path)!r} is already named for {resolve_target(target).name}, so the default output "
            "would replace it; retarget the anchor file, or give -o/--output for a copy"
        )
    # Fail on the output path before loading and converting a large model.
    _onnx_io.check_output_path(out_path, force=force, protected=[in_path])

    model, files = _onnx_io.load_model_with_files(in_path)
    new_model, report = retarget_model(
        model,
        target,
        layers=layers,
        activations=activations,
        allow_requantize_lowbit=allow_requantize_lowbit,
        progress=progress,
    )
    del model
    report.input_files = files
    report.output_files = _onnx_io.save_model(new_model, out_path, force=force, protected=files)
    return out_path, report
