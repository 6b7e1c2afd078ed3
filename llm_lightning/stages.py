"""The per-stage compression report: every stage measured the same way (llm_lightning.bench),
written as `report.json`, `report.md` (one row per stage), `pareto.png` (accuracy against
throughput) and to TensorBoard (hparams per stage, the table as text). Every stage after the first
is also compared with the first (the teacher, or the fp32 input) text by text on the same test
texts (llm_lightning.measure.paired): the accuracy difference with its paired bootstrap interval,
the exact McNemar p-value and the share of identical predictions.

    python -m llm_lightning.stages outputs/sentiment/<date>/<time>     # re-measure a run's stages

A "compressed" stage slower than its input is a warning; with `quantize.require_speedup=true`
it is an error (the report is still written first, so you can see why).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from llm_lightning.bench import BenchSettings, cpu_name, measure
from llm_lightning.errors import MissingFileError, UnsupportedError, UserError
from llm_lightning.export import write_json
from llm_lightning.measure.paired import compare

log = logging.getLogger(__name__)

SPEED_KEY = "tokens_per_s_b16"  # what "faster" means: batch-16 throughput on real test texts
# per-text lists a row carries from measure_stage; report.json keeps them apart, under "per_text"
PER_TEXT = ("predictions", "labels")
PAIRED = {"rounds": 10_000, "seed": 0, "level": 0.95}  # bootstrap of the comparison with the first stage
DIFF_KEYS = ("vs_first_acc_diff", "vs_first_acc_diff_low", "vs_first_acc_diff_high")


def _points(row: dict) -> str:
    """The accuracy difference and its interval, in percentage points: "-1.05 [-1.99, -0.12]"."""
    return "{:+.2f} [{:+.2f}, {:+.2f}]".format(*(100 * row[k] for k in DIFF_KEYS))


# (column, header, format or a function of the row) for report.md; report.json has every key of every row.
COLUMNS = (
    ("stage", "stage", "{}"),
    ("input", "input", "{}"),
    ("acc", "test acc", "{:.4f}"),
    ("f1_macro", "macro-F1", "{:.4f}"),
    ("vs_first_acc_diff", "vs first: Δacc pts [95% CI]", _points),
    ("vs_first_mcnemar_p", "McNemar p", "{:.3g}"),
    ("vs_first_agreement", "agree", "{:.2%}"),
    ("tokens_per_s_b16", "tok/s b16", "{:,.0f}"),
    ("texts_per_s_b16", "texts/s b16", "{:,.1f}"),
    ("tokens_per_s_b32", "tok/s b32", "{:,.0f}"),
    ("texts_per_s_b32", "texts/s b32", "{:,.1f}"),
    ("latency_p50_ms", "p50 ms b1", "{:.1f}"),
    ("latency_p95_ms", "p95 ms b1", "{:.1f}"),
    ("speedup", "speedup vs input", "{:.2f}x"),
    ("speedup_vs_first", "vs first stage", "{:.2f}x"),
    ("params", "params", "{:,.0f}"),
    ("size_mb", "disk MB", "{:.1f}"),
    ("peak_rss_mb", "peak RSS MB", "{:,.0f}"),
    ("threads", "threads", "{:.0f}"),
    ("padding_free", "padding-free", "{}"),
)


class NoTestSplitError(UserError):
    """The report measures accuracy and speed on the task's test split, and there is none."""


class SpeedGateError(UnsupportedError):
    """A compressed stage is slower than its input and `quantize.require_speedup=true`."""


def bench_settings(cfg: DictConfig) -> BenchSettings:
    """`cfg.bench` (config group `bench=`), or the defaults when a config has none."""
    if cfg.get("bench") is None:
        return BenchSettings()
    values = OmegaConf.to_container(cfg.bench, resolve=True)
    return BenchSettings(**values)


def require_test_split(data, where: str) -> None:
    test = getattr(data, "test", None)
    if test is None or len(test) == 0:
        raise NoTestSplitError(
            f"The stage report for {where} needs the task's test split, and it has "
            f"{'none' if test is None else 'an empty one'}. Give the task a test split: "
            "task.split=[train, val, test] fractions with test > 0, or task.test_path=<file>."
        )


def measure_stage(
    name: str,
    model: nn.Module,
    tokenizer,
    data,
    cfg: DictConfig,
    path: Path | None,
    settings: BenchSettings,
    compile: bool = False,
    input_stage: str | None = None,
    compressed: bool = True,
) -> dict:
    """One report row: the bench measurements of `model` on the test split, plus what the stage is.

    `compressed`: the stage claims to make its input smaller or faster (pruning, quantization), so
    the speed gate applies; a stage that only retrains (distillation into the same shape) does not.
    """
    from llm_lightning.compiling import maybe_compile

    require_test_split(data, str(path or name))
    runnable = maybe_compile(model, compile)
    log.info("Measuring stage %s (compile=%s) on %d test texts", name, compile, len(data.test))
    row = measure(
        runnable,
        tokenizer,
        data.test.texts,
        data.test.labels,
        settings,
        path=path,
        num_labels=len(data.label_names),
    )
    row.update(
        {
            "labels": [int(label) for label in data.test.labels],  # to pair this stage with others
            "stage": name,
            "input": input_stage,
            "compressed": bool(compressed and input_stage),
            "compile": bool(compile),
            "path": str(path) if path else None,
        }
    )
    return row


def speed_warnings(rows: list[dict]) -> list[str]:
    """A message for each compressed stage slower (batch-16 tokens/s) than its input; also sets
    each row's `speedup` (against its input) and `speedup_vs_first` (against the first stage)."""
    by_name = {r["stage"]: r for r in rows}
    found = []
    for row in rows:
        row["speedup_vs_first"] = row[SPEED_KEY] / rows[0][SPEED_KEY]
        source = by_name.get(row.get("input"))
        if source is None:
            continue
        row["speedup"] = row[SPEED_KEY] / source[SPEED_KEY]
        if row.get("compressed", True) and row[SPEED_KEY] < source[SPEED_KEY]:
            found.append(
                f"Stage {row['stage']!r} is slower than its input {source['stage']!r}: "
                f"{row[SPEED_KEY]:,.0f} vs {source[SPEED_KEY]:,.0f} tokens/s at batch 16 "
                f"({row['speedup']:.2f}x)."
            )
    return found


def paired_with_first(rows: list[dict]) -> None:
    """Set each later row's comparison with the first, from both rows' per-text predictions:
    `vs_first_acc_diff` (this stage's accuracy minus the first's) with `vs_first_acc_diff_low` /
    `_high` (its paired bootstrap interval, `PAIRED`), `vs_first_mcnemar_p`, `vs_first_agreement`,
    `vs_first_only_first_right` / `vs_first_only_this_right` (texts only one of them gets right)
    and `vs_first_n` (texts). A row without predictions and labels gets none of them."""
    first = rows[0] if rows else {}
    if not all(key in first for key in PER_TEXT):
        return
    for row in rows[1:]:
        if not all(key in row for key in PER_TEXT):
            continue
        if row["labels"] != first["labels"]:
            raise ValueError(
                f"Stages {first['stage']!r} and {row['stage']!r} were measured on different test texts "
                f"({len(first['labels'])} and {len(row['labels'])} labels, or a different order): "
                "they cannot be compared text by text."
            )
        got = compare(first["labels"], first["predictions"], row["predictions"], **PAIRED)
        names = {"discordant_a_right": "only_first_right", "discordant_b_right": "only_this_right"}
        row.update({f"vs_first_{names.get(k, k)}": v for k, v in got.items()})


def environment() -> dict:
    return {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
    }


def write_report(
    rows: list[dict], out: Path, cfg: DictConfig | None = None, require_speedup: bool = False
) -> dict:
    """Write report.json, report.md, pareto.png and TensorBoard entries; then apply the speed gate."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    found = speed_warnings(rows)
    paired_with_first(rows)
    table = [{k: v for k, v in row.items() if k not in PER_TEXT} for row in rows]
    report = {"environment": environment(), "speed_key": SPEED_KEY, "stages": table, "warnings": found}
    if rows and "vs_first_n" in table[-1]:
        report["paired"] = {"against": rows[0]["stage"], "texts": table[-1]["vs_first_n"], **PAIRED}
    if cfg is not None and cfg.get("runtime") is not None:
        report["runtime"] = OmegaConf.to_container(cfg.runtime, resolve=True)
    quantize = cfg.get("quantize") if cfg is not None else None
    if quantize is not None and quantize.get("method", "none") != "none":
        # as used: `smoothquant_alpha: auto` has been replaced by the alpha it chose
        report["quantize"] = OmegaConf.to_container(quantize, resolve=True)
    # the per-text lists (one int per test text and stage) stay out of the rows, which remain a
    # flat table of numbers; kept under their own key, any two stages can be paired again from here
    per_text = {r["stage"]: r["predictions"] for r in rows if "predictions" in r}
    if per_text:
        report["per_text"] = {"labels": rows[0].get("labels"), "predictions": per_text}
    write_json(out / "report.json", report)
    (out / "report.md").write_text(markdown(report))
    pareto_plot(rows, out / "pareto.png")
    to_tensorboard(report, out / "tensorboard" / "report")
    for message in found:
        warnings.warn(message, stacklevel=2)
        log.warning(message)
    print(f"Stage report:    {out / 'report.md'}  (also report.json, pareto.png)", flush=True)
    if found and require_speedup:
        raise SpeedGateError(
            " ".join(found) + f" Report: {out / 'report.md'}. "
            "Set quantize.require_speedup=false to allow it, or try quantize.compile=true."
        )
    return report


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        "# Compression report\n",
        f"{env['cpu']}, {env['threads']} torch threads, torch {env['torch']}. "
        f"Speed is real (non-pad) tokens/s on the test texts; speedup uses `{report['speed_key']}`.\n",
        "| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in report["stages"]:
        cells = []
        for key, _, fmt in COLUMNS:
            value = row.get(key)
            cells.append("—" if value is None else fmt(row) if callable(fmt) else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    if "paired" in report:
        paired = report["paired"]
        lines.append(
            f"\nvs first: each stage against {paired['against']!r} on the same {paired['texts']} test texts, "
            f"text by text. Δacc is in accuracy points with its {paired['level']:.0%} paired bootstrap "
            f"interval ({paired['rounds']:,} resamples of the texts, seed {paired['seed']}); McNemar p is the "
            "exact two-sided test on the texts only one of the two gets right; agree is the share of "
            "identical predictions."
        )
    if "quantize" in report:
        settings = ", ".join(f"{k}={v}" for k, v in report["quantize"].items())
        lines.append(f"\nQuantization settings: {settings}")
    if report["warnings"]:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"


def pareto_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # points numbered in stage order, names in the legend: stage names written beside the points
    # overlapped once several stages landed close together (a 6-stage chain's 15- and 11-layer students)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.plot([r[SPEED_KEY] for r in rows], [r["acc"] * 100 for r in rows], color="0.8", lw=1, zorder=1)
    for i, row in enumerate(rows, 1):
        x, y = row[SPEED_KEY], row["acc"] * 100
        ax.scatter(x, y, s=40, zorder=2, label=f"{i}. {row['stage']}: {y:.2f}%, {x:,.0f} tok/s")
        ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=9)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    ax.set_xlabel("throughput, tokens/s at batch 16 (test texts)")
    ax.set_ylabel("test accuracy, %")
    ax.set_title("Accuracy against throughput, one point per stage")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def to_tensorboard(report: dict, logdir: Path) -> None:
    """One hparams entry per stage (stage, input, threads -> the measurements) and the table as text."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(logdir)) as writer:
        writer.add_text("report", markdown(report))
        for row in report["stages"]:
            hparams = {
                "stage": row["stage"],
                "input": str(row.get("input")),
                "compile": bool(row.get("compile")),
                "padding_free": bool(row.get("padding_free")),
                "threads": int(row["threads"]),
            }
            metrics = {
                f"report/{k}": float(v)
                for k, v in row.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and k not in ("threads",)
            }
            writer.add_hparams(hparams, metrics, run_name=row["stage"].replace("+", "_"))


def stage_dirs(run_dir: Path) -> list[tuple[str, Path, str | None, bool]]:
    """(stage, folder, input stage, compile) for every exported stage in a run directory, in chain order."""
    from llm_lightning.quantized_dir import META_FILE

    found = []
    if (run_dir / "model" / "config.json").exists():
        found.append(("fp32", run_dir / "model", None, False))
    if (run_dir / "quantized" / META_FILE).exists():
        meta = json.loads((run_dir / "quantized" / META_FILE).read_text())
        name = meta["method"] + ("+compile" if meta.get("compile") else "")
        found.append((name, run_dir / "quantized", "fp32" if found else None, bool(meta.get("compile"))))
    return found


def _alpha_as_saved(cfg: DictConfig, run_dir: Path) -> None:
    """The run's config may say `smoothquant_alpha: auto`; its quantized/ folder records the alpha
    chosen, which the report's settings must show."""
    from llm_lightning.quantized_dir import META_FILE

    meta = run_dir / "quantized" / META_FILE
    if meta.exists() and cfg.get("quantize") is not None:
        with open_dict(cfg):
            cfg.quantize.smoothquant_alpha = json.loads(meta.read_text()).get("smoothquant_alpha")


def report_for_run(run_dir: Path, cfg: DictConfig | None = None, require_speedup: bool = False) -> dict:
    """Load every stage a run exported, measure each on the run's test split, write the report there."""
    from llm_lightning.data import load_task
    from llm_lightning.models.saved import load_saved

    run_dir = Path(run_dir)
    config_file = run_dir / ".hydra" / "config.yaml"
    if cfg is None:
        if not config_file.exists():
            raise MissingFileError(f"No {config_file}: the report reads the run's task and seed from it.")
        cfg = OmegaConf.load(config_file)
    _alpha_as_saved(cfg, run_dir)
    stages = stage_dirs(run_dir)
    if not stages:
        raise MissingFileError(f"{run_dir} has no exported stage (model/ or quantized/) to report on.")
    data = load_task(cfg.task, cfg.seed)
    require_test_split(data, str(run_dir))
    settings = bench_settings(cfg)
    rows = []
    for name, path, source, compile in stages:
        model, tokenizer, _ = load_saved(path)
        rows.append(measure_stage(name, model, tokenizer, data, cfg, path, settings, compile, source))
        del model
    return write_report(rows, run_dir, cfg, require_speedup)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m llm_lightning.stages",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", type=Path, help="a run directory (with .hydra/config.yaml and model/)")
    parser.add_argument(
        "--require-speedup", action="store_true", help="fail if a stage is slower than its input"
    )
    args = parser.parse_args(argv)
    try:
        report_for_run(args.run_dir, require_speedup=args.require_speedup)
    except (NoTestSplitError, SpeedGateError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
