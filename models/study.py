"""Compare fp32, PTQ, single-format QAT and MF-QAT on one workload and one format family.

Usage::

    python -m models.study --workload digits-cnn --family int --seeds 0,1,2 -o study/digits-int.json
    python -m models.study --workload tiny-lm --family int -o study/tiny-lm-int.json

Every arm starts from the same fp32 weights (trained from scratch with the
workload's recipe, or the published weights of a pretrained workload) and is
then fine-tuned with the workload's fine-tuning recipe, the same number of
steps for every arm:

- ``fp32``: fine-tuned without quantization; ``ptq`` quantizes it directly to
  each format, ``ptq_via_anchor`` through the 8-bit anchor (what retargeting
  an fp32 export gives).
- ``qat``: one single-format QAT run per format (direct quantization).
- ``mfqat``: one MF-QAT run over all formats (via the anchor, sample schedule),
  evaluated in each format.

With several seeds every number is the mean over seeds. The JSON output keeps
the per-seed values. Runs use one CPU thread.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mfqat_onnx.evaluate import format_table
from mfqat_onnx.formats import family_formats, get_format
from mfqat_onnx.qat import QuantConfig, TrainRecipe, fit, prepare, ptq, set_format
from mfqat_onnx.qat._files import write_json_atomic
from models import Workload, WorkloadData, get_workload

logger = logging.getLogger(__name__)

FAMILY_FORMATS = {
    "int": ["mxint2", "mxint4", "mxint6", "mxint8"],
    "fp": ["mxfp4_e2m1", "mxfp6_e2m3", "mxfp8_e4m3"],
}


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """Settings of one study run: workload, formats, seeds and step counts."""

    workload: str
    formats: tuple[str, ...]
    seeds: tuple[int, ...]
    pretrain_steps: int | None
    finetune_steps: int | None
    progress: bool
    quant_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


def pretrained_weights(workload: Workload, data: WorkloadData, seed: int, steps: int | None, progress: bool) -> dict:
    """Return the fp32 starting weights: published ones, or trained from scratch with ``seed``."""
    torch.manual_seed(seed)
    model = workload.build_model(**workload.model_kwargs)
    if not workload.pretrained:
        recipe = workload.recipe.replace(steps=steps)
        fit(model, workload.loss_fn, data.train, recipe, None, seed=seed, progress=progress, desc="fp32 pretrain")
    return copy.deepcopy(model.state_dict())


def finetune(
    workload: Workload,
    data: WorkloadData,
    start: dict,
    config: QuantConfig | None,
    recipe: TrainRecipe,
    seed: int,
    progress: bool,
    desc: str,
) -> nn.Module:
    """Return a model built from ``start`` weights, prepared with ``config`` and fine-tuned."""
    model = workload.build_model(**workload.model_kwargs)
    model.load_state_dict(start)
    if config is not None:
        prepare(model, config)
    fit(model, workload.loss_fn, data.train, recipe, config, seed=seed, progress=progress, desc=desc)
    return model


Metrics = dict[str, float]


def metrics(workload: Workload, model: nn.Module, data: WorkloadData) -> Metrics:
    """Return every metric of ``model`` on the held-out split."""
    return {name: float(value) for name, value in workload.evaluate(model, data.eval).items()}


def run_seed(
    workload: Workload, data: WorkloadData, settings: StudySettings, seed: int, *, keep_models: bool = False
) -> Any:
    """Run every arm once.

    Returns:
        ``{arm: {format: metrics}}``, the fp32 arm under format ``"fp32"``.
        With ``keep_models`` also a dict of what was trained: ``"start"`` (the
        starting state dict), ``"fp32"``, ``"mfqat"`` and ``"qat"`` (format →
        model), as ``(results, models)``.
    """
    overrides = {**workload.quant_defaults, **settings.quant_overrides}
    start = pretrained_weights(workload, data, seed, settings.pretrain_steps, settings.progress)
    recipe = workload.recipe_for(True).replace(steps=settings.finetune_steps)
    results: dict[str, dict[str, Metrics]] = {"fp32": {}, "ptq": {}, "ptq_via_anchor": {}, "qat": {}, "mfqat": {}}

    # fp32 fine-tuning, and PTQ of its result.
    fp32_model = finetune(workload, data, start, None, recipe, seed, settings.progress, "fp32")
    results["fp32"]["fp32"] = metrics(workload, fp32_model, data)
    for fmt in settings.formats:
        direct = QuantConfig(formats=[fmt], mode="direct", **overrides)
        via_anchor = QuantConfig(formats=[fmt], mode="via_anchor", **overrides)
        results["ptq"][fmt] = metrics(workload, ptq(fp32_model, fmt, direct), data)
        results["ptq_via_anchor"][fmt] = metrics(workload, ptq(fp32_model, fmt, via_anchor), data)

    # Single-format QAT, one run per format.
    qat_models = {}
    for fmt in settings.formats:
        config = QuantConfig(formats=[fmt], mode="direct", **overrides)
        model = finetune(workload, data, start, config, recipe, seed, settings.progress, f"qat {fmt}")
        results["qat"][fmt] = metrics(workload, model, data)
        if keep_models:
            qat_models[fmt] = model

    # One MF-QAT run over every format.
    config = QuantConfig(formats=list(settings.formats), mode="via_anchor", schedule="sample", **overrides)
    model = finetune(workload, data, start, config, recipe, seed, settings.progress, "mf-qat")
    for fmt in settings.formats:
        set_format(model, fmt)
        results["mfqat"][fmt] = metrics(workload, model, data)
    set_format(model, config.widest_format())
    if keep_models:
        return results, {"start": start, "fp32": fp32_model, "mfqat": model, "qat": qat_models}
    return results


def mean_over_seeds(per_seed: Sequence[dict[str, dict[str, Metrics]]]) -> dict[str, dict[str, Metrics]]:
    """Average each metric of ``{arm: {format: metrics}}`` dicts over seeds."""
    first = per_seed[0]
    return {
        arm: {
            fmt: {name: statistics.fmean(run[arm][fmt][name] for run in per_seed) for name in first[arm][fmt]}
            for fmt in first[arm]
        }
        for arm in first
    }


def summarize(workload: Workload, mean: dict[str, dict[str, Metrics]], formats: Sequence[str]) -> list[dict[str, Any]]:
    """Return one table row per format with the gaps the study checks.

    ``mfqat_vs_qat`` is in metric points for a higher-is-better metric
    (accuracy), and in percent of the single-format QAT value for a
    lower-is-better one (perplexity). A positive gap means MF-QAT is worse.
    """
    key = workload.metric
    rows = []
    for fmt in formats:
        qat, mfqat, ptq_value = mean["qat"][fmt][key], mean["mfqat"][fmt][key], mean["ptq"][fmt][key]
        if workload.higher_is_better:
            gap = qat - mfqat
        else:
            gap = 100.0 * (mfqat / qat - 1.0)
        rows.append(
            {
                "format": fmt,
                "fp32": mean["fp32"]["fp32"][key],
                "ptq": ptq_value,
                "ptq_via_anchor": mean["ptq_via_anchor"][fmt][key],
                "qat": qat,
                "mfqat": mfqat,
                "mfqat_vs_qat": gap,
                "mfqat_beats_ptq": workload.better(mfqat, ptq_value) if get_format(fmt).bits <= 4 else None,
            }
        )
    return rows


def run_study(settings: StudySettings) -> dict[str, Any]:
    """Run the study for every seed; return the JSON-ready result."""
    torch.set_num_threads(1)
    workload = get_workload(settings.workload)
    data = workload.load_data()
    start = time.perf_counter()
    per_seed = []
    for seed in settings.seeds:
        logger.info("seed %d", seed)
        per_seed.append(run_seed(workload, data, settings, seed))
    mean = mean_over_seeds(per_seed)
    return {
        "workload": workload.name,
        "metric": workload.metric,
        "higher_is_better": workload.higher_is_better,
        "formats": list(settings.formats),
        "seeds": list(settings.seeds),
        "pretrain_recipe": None if workload.pretrained else dataclasses.asdict(workload.recipe.replace(steps=settings.pretrain_steps)),
        "finetune_recipe": dataclasses.asdict(workload.recipe_for(True).replace(steps=settings.finetune_steps)),
        "quant_settings": {**workload.quant_defaults, **settings.quant_overrides},
        "mean": mean,
        "per_seed": per_seed,
        "table": summarize(workload, mean, settings.formats),
        "seconds": time.perf_counter() - start,
        "torch_threads": torch.get_num_threads(),
    }


def parse_args(argv: Sequence[str] | None) -> tuple[StudySettings, Path | None]:
    """Parse the command line into study settings and the JSON output path."""
    from models import list_workloads

    parser = argparse.ArgumentParser(prog="python -m models.study", description=__doc__.splitlines()[0])
    parser.add_argument("--workload", required=True, choices=list_workloads())
    parser.add_argument("--family", choices=sorted(FAMILY_FORMATS), default="int", help="format family (default: int)")
    parser.add_argument("--formats", help="comma-separated formats instead of the family's default list")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; results are averaged (default: 0)")
    parser.add_argument("--pretrain-steps", type=int, help="fp32 steps from scratch (default: the workload recipe)")
    parser.add_argument("--finetune-steps", type=int, help="fine-tuning steps of every arm (default: the recipe)")
    parser.add_argument(
        "--quantize-first-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="quantize the first and last layers too (default: the workload's choice)",
    )
    parser.add_argument("-o", "--output", type=Path, help="write the results to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)

    try:
        seeds = tuple(int(s) for s in args.seeds.split(","))
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers such as 0,1,2; got {args.seeds!r}")
    formats = FAMILY_FORMATS[args.family] if args.formats is None else args.formats.split(",")
    family = {f.name for f in family_formats(args.family)}
    try:
        canonical = [QuantConfig(formats=[f]).formats[0] for f in formats]
    except ValueError as err:
        parser.error(str(err))
    outside = [f for f in canonical if f not in family]
    if outside:
        parser.error(f"formats {', '.join(outside)} are not in the {args.family} family")
    settings = StudySettings(
        workload=args.workload,
        formats=tuple(canonical),
        seeds=seeds,
        pretrain_steps=args.pretrain_steps,
        finetune_steps=args.finetune_steps,
        progress=not args.no_progress,
        quant_overrides={} if args.quantize_first_last is None else {"quantize_first_last": args.quantize_first_last},
    )
    return settings, args.output


def print_result(result: dict[str, Any]) -> None:
    """Print the study table."""
    higher = result["higher_is_better"]
    unit = "points" if higher else "%"
    print(
        f"{result['workload']}: {result['metric']} ({'higher' if higher else 'lower'} is better), "
        f"mean over seeds {result['seeds']}; mfqat_vs_qat in {unit}, positive = MF-QAT worse"
    )
    columns = ["format", "fp32", "ptq", "ptq_via_anchor", "qat", "mfqat", "mfqat_vs_qat", "mfqat_beats_ptq"]
    print(format_table(result["table"], columns))
    print(f"({result['seconds']:.0f} s)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the study from the command line; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    settings, output = parse_args(argv)
    result = run_study(settings)
    print_result(result)
    if output is not None:
        write_json_atomic(output, result)
        print(f"wrote {output}")
    return 0 if all(not math.isnan(row["mfqat"]) for row in result["table"]) else 1


if __name__ == "__main__":
    sys.exit(main())
