"""The per-stage compression report: every stage measured the same way (llm_lightning.bench),
written as `report.json`, `report.md` (one row per stage), `pareto.png` (accuracy against
throughput) and to TensorBoard (hparams per stage, the table as text; those three are drawn by
llm_lightning.measure.report_files). Every stage after the first
is also compared with the first (the teacher, or the fp32 input) text by text on the same test
texts (llm_lightning.measure.paired): the accuracy difference with its paired bootstrap interval,
the exact McNemar p-value and the share of identical predictions.

    python -m llm_lightning.report run_dir=outputs/sentiment/<date>/<time>   # re-measure a run's stages

A "compressed" stage slower than its input is a warning; with `quantize.require_speedup=true`
it is an error (the report is still written first, so you can see why).
"""

from __future__ import annotations

import logging
import os
import platform
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from llm_lightning.artifacts import best_validation_accuracy, write_json
from llm_lightning.errors import MissingFileError, UnsupportedError, UserError
from llm_lightning.measure.bench import BenchSettings, cpu_name, measure
from llm_lightning.measure.paired import compare
from llm_lightning.measure.report_files import markdown, pareto_plot, to_tensorboard
from llm_lightning.quantization.onednn_int8 import int8_codes_name

log = logging.getLogger(__name__)

SPEED_KEY = "tokens_per_s_b16"  # what "faster" means: batch-16 throughput on real test texts
# the final forms (`final`) timed again at batch 16, in turns batch by batch: their ratios without
# the machine's drift, which rows measured one after another carry (a chain's ONNX Runtime form
# read 0.62x its OpenVINO form in the report, 0.95x in turns: docs/BENCHMARKS.md, "The chain")
TURNS_KEY = "tokens_per_s_b16_turns"
LATENCY_KEY = "latency_p50_ms"  # and "quicker": one text at a time, the median
# per-text lists a row carries from measure_stage; report.json keeps them apart, under "per_text"
PER_TEXT = ("predictions", "labels")
PAIRED = {"rounds": 10_000, "seed": 0, "level": 0.95}  # bootstrap of the comparison with the first stage


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
    from llm_lightning.measure.compiling import maybe_compile

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


def validation_accuracy(model_dir: Path) -> float | None:
    """`val/acc_best` of the training run that exported `model_dir` (its metrics.json beside
    `model/`): the figure a choice between stages goes by, the test column being reported, not
    chosen on. None for a quantized or exported form (not trained) or a folder from elsewhere."""
    if Path(model_dir).name != "model":
        return None
    return best_validation_accuracy(Path(model_dir).parent)


def speed_warnings(rows: list[dict]) -> list[str]:
    """A message for each compressed stage slower (batch-16 tokens/s) than its input; also sets
    each row's `speedup` (against its input), `speedup_vs_first` (against the first stage) and
    `latency_speedup_vs_first` (the first stage's batch-1 p50 over this one's: 6.0x is 1/6 the time)."""
    by_name = {r["stage"]: r for r in rows}
    found = []
    for row in rows:
        row["speedup_vs_first"] = row[SPEED_KEY] / rows[0][SPEED_KEY]
        if row.get(LATENCY_KEY) and rows[0].get(LATENCY_KEY):
            row["latency_speedup_vs_first"] = rows[0][LATENCY_KEY] / row[LATENCY_KEY]
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


def fastest_of(rows: list[dict], names: Sequence[str]) -> dict | None:
    """The fastest (`SPEED_KEY`) of the rows named, with its accuracy and its paired comparison
    with the first stage: what the report recommends deploying, and on what evidence. A form
    quicker one text at a time (`LATENCY_KEY`) is named too, as `quickest_b1`: a service that
    answers each request alone deploys that one."""
    chosen = [r for r in rows if r["stage"] in names]
    if len(chosen) < 2:
        return None
    by = TURNS_KEY if all(TURNS_KEY in r for r in chosen) else SPEED_KEY
    best = max(chosen, key=lambda r: r[by])
    diff = ("vs_first_acc_diff", "vs_first_acc_diff_low", "vs_first_acc_diff_high")
    latency = (LATENCY_KEY, "latency_speedup_vs_first")
    turns = (TURNS_KEY, f"{TURNS_KEY}_min", f"{TURNS_KEY}_max")
    keys = ("stage", SPEED_KEY, "speedup_vs_first", "acc", *diff, *latency, *turns)
    fastest = {k: best[k] for k in keys if k in best} | {"among": list(names), "by": by}
    timed = [r for r in chosen if r.get(LATENCY_KEY)]
    quickest = min(timed, key=lambda r: r[LATENCY_KEY]) if timed else best
    if quickest is not best:
        fastest["quickest_b1"] = {k: quickest[k] for k in ("stage", "acc", *latency) if k in quickest}
    return fastest


def environment() -> dict:
    return {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # AVX2, AVX512, ...
        # what oneDNN's int8 linear takes here: 7-bit activation codes without VNNI (AVX2)
        "int8_activation_codes": int8_codes_name(),
        "cores": os.cpu_count(),
    }


def write_report(
    rows: list[dict],
    out: Path,
    cfg: DictConfig | None = None,
    require_speedup: bool = False,
    quantize: dict | None = None,
    final: Sequence[str] = (),
    final_choice: dict | None = None,
) -> dict:
    """Write report.json, report.md, pareto.png and TensorBoard entries; then apply the speed gate.
    `quantize`: the quantization settings the stages were made with (`settings_as_used`).
    `final`: the stages that are one model in different forms (compress's last student, quantized
    and exported): the report names the fastest of them, `fastest_final`. `final_choice`: how the
    final training stage was chosen among several on validation (llm_lightning.chain.final)."""
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
    if quantize is not None and quantize.get("method", "none") != "none":
        report["quantize"] = quantize
    if final_choice is not None:
        report["final_choice"] = final_choice
    if fastest := fastest_of(table, final):
        report["fastest_final"] = fastest
    # the per-text lists (one int per test text and stage) stay out of the rows, which remain a
    # flat table of numbers; kept under their own key, any two stages can be paired again from here
    per_text = {r["stage"]: r["predictions"] for r in rows if "predictions" in r}
    if per_text:
        report["per_text"] = {"labels": rows[0].get("labels"), "predictions": per_text}
    write_json(out / "report.json", report)
    (out / "report.md").write_text(markdown(report))
    pareto_plot(rows, out / "pareto.png", SPEED_KEY)
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


@dataclass(frozen=True)
class Stage:
    """One exported stage of a report: its row's name, its folder and how it is measured."""

    name: str
    path: Path
    input: str | None = None  # the stage it was made from: its speedup is against that one
    compile: bool = False  # torch.compile it before measuring
    compressed: bool = True  # it claims to be smaller or faster than its input (measure_stage)


def report_stages(
    stages: Sequence[Stage],
    data,
    cfg: DictConfig,
    out: Path,
    quantize: dict | None = None,
    require_speedup: bool = False,
    final: Sequence[str] = (),
    final_choice: dict | None = None,
) -> dict:
    """Load each stage from its folder, measure it on the test split (one model in memory at a
    time) and write the report to `out`: the one loop `quantize`, `compress` and `report_for_run`
    share. `quantize`: the quantization settings as used, for the report; `final`, `final_choice`:
    as `write_report`'s. Returns the report."""
    from llm_lightning.models.saved import load_saved

    require_test_split(data, str(out))
    settings = bench_settings(cfg)
    rows = []
    for stage in stages:
        model, tokenizer, _ = load_saved(stage.path)
        rows.append(
            measure_stage(
                stage.name,
                model,
                tokenizer,
                data,
                cfg,
                stage.path,
                settings,
                stage.compile,
                stage.input,
                stage.compressed,
            )
        )
        if (val := validation_accuracy(stage.path)) is not None:
            rows[-1]["val_acc_best"] = val
        del model
    forms = [stage for stage in stages if stage.name in final]
    if len(forms) >= 2:
        in_turns = final_forms_in_turns(forms, data, settings)
        for row in rows:
            row.update(in_turns.get(row["stage"], {}))
    return write_report(rows, out, cfg, require_speedup, quantize, final, final_choice)


def final_forms_in_turns(forms: Sequence[Stage], data, settings: BenchSettings) -> dict[str, dict]:
    """Batch-16 tokens/s of the final model's forms timed in turns batch by batch
    (llm_lightning.measure.bench.turns), all loaded at once, each run as its row was measured
    (compiled or not, padding-free as `bench.padding_free` says), over `bench.repeats` rounds of
    the first `bench.throughput_texts` test texts: `{stage: {TURNS_KEY: median, TURNS_KEY_min:
    slowest round, TURNS_KEY_max: fastest}}`."""
    from llm_lightning.measure.bench import rates_in_turns, spread, timed_pass, turn_batches
    from llm_lightning.measure.compiling import maybe_compile
    from llm_lightning.measure.padding_free import padding_free
    from llm_lightning.models.saved import load_saved

    models, tokenizer = {}, None
    for stage in forms:
        model, tokenizer, _ = load_saved(stage.path)
        model = maybe_compile(model, stage.compile)
        if settings.padding_free:
            model = padding_free(model, tokenizer.pad_token_id)
        models[stage.name] = model.eval()
    texts = list(data.test.texts[: settings.throughput_texts])
    log.info("Timing the final forms in turns at batch 16: %s", ", ".join(models))
    batches = turn_batches(tokenizer, texts, 16, settings.max_length)
    with torch.inference_mode():
        for model in models.values():
            for _ in range(settings.warmup):  # compiles, warms caches: untimed
                timed_pass(model, batches)
    rates = rates_in_turns(models, tokenizer, texts, 16, settings.repeats, settings.max_length)
    return {name: spread({TURNS_KEY: per_round}) for name, per_round in rates.items()}


def stage_dirs(run_dir: Path) -> list[Stage]:
    """Every exported stage in a run directory, in chain order."""
    from llm_lightning.quantization.saved import is_quantized_dir, read_meta
    from llm_lightning.runtimes import choice_of, is_runtime_dir

    found = []
    if (run_dir / "model" / "config.json").exists():
        found.append(Stage("fp32", run_dir / "model"))
    if is_runtime_dir(run_dir / "quantized"):  # quantize=onnx_int8 | openvino_int8 | ...
        found.append(
            Stage(choice_of(run_dir / "quantized"), run_dir / "quantized", "fp32" if found else None)
        )
    elif is_quantized_dir(run_dir / "quantized"):
        meta = read_meta(run_dir / "quantized")
        name = meta["method"] + ("+compile" if meta.get("compile") else "")
        source = "fp32" if found else None
        found.append(Stage(name, run_dir / "quantized", source, bool(meta.get("compile"))))
    return found


def run_quantize_settings(cfg: DictConfig, run_dir: Path) -> dict | None:
    """The run's quantize settings for its report; the alpha as its quantized/ folder records it
    (the run's config may say `smoothquant_alpha: auto`)."""
    from llm_lightning.quantization.saved import is_quantized_dir, used_settings
    from llm_lightning.quantization.settings import settings_as_used
    from llm_lightning.runtimes import is_runtime_dir
    from llm_lightning.runtimes import used_settings as runtime_settings

    qcfg = cfg.get("quantize")
    if qcfg is None:
        return None
    if is_quantized_dir(run_dir / "quantized"):
        return used_settings(qcfg, run_dir / "quantized")
    if is_runtime_dir(run_dir / "quantized"):
        return runtime_settings(qcfg, run_dir / "quantized")
    return settings_as_used(qcfg, qcfg.get("smoothquant_alpha"))


def report_for_run(run_dir: Path, cfg: DictConfig | None = None, require_speedup: bool = False) -> dict:
    """Load every stage a run exported, measure each on the run's test split, write the report there."""
    from llm_lightning.data import load_task

    run_dir = Path(run_dir)
    config_file = run_dir / ".hydra" / "config.yaml"
    if cfg is None:
        if not config_file.exists():
            raise MissingFileError(f"No {config_file}: the report reads the run's task and seed from it.")
        cfg = OmegaConf.load(config_file)
    stages = stage_dirs(run_dir)
    if not stages:
        raise MissingFileError(f"{run_dir} has no exported stage (model/ or quantized/) to report on.")
    data = load_task(cfg.task, cfg.seed)
    quantize = run_quantize_settings(cfg, run_dir)
    return report_stages(stages, data, cfg, run_dir, quantize, require_speedup)
