"""How a stage report is shown: `report.md`'s table, `pareto.png` (accuracy against throughput)
and the TensorBoard entries (hparams per stage, the table as text). The numbers come from
llm_lightning.measure.stage_report, which writes `report.json` and calls these."""

from __future__ import annotations

from pathlib import Path

DIFF_KEYS = ("vs_first_acc_diff", "vs_first_acc_diff_low", "vs_first_acc_diff_high")


def _points(row: dict) -> str:
    """The accuracy difference and its interval, in percentage points: "-1.05 [-1.99, -0.12]"."""
    return "{:+.2f} [{:+.2f}, {:+.2f}]".format(*(100 * row[k] for k in DIFF_KEYS))


# (column, header, format or a function of the row) for report.md; report.json has every key of every row.
COLUMNS = (
    ("stage", "stage", "{}"),
    ("input", "input", "{}"),
    ("val_acc_best", "val acc (training)", "{:.4f}"),  # what a choice between stages goes by
    ("acc", "test acc", "{:.4f}"),
    ("f1_macro", "macro-F1", "{:.4f}"),
    ("vs_first_acc_diff", "vs first: Δacc pts [95% CI]", _points),
    ("vs_first_mcnemar_p", "McNemar p", "{:.3g}"),
    ("vs_first_agreement", "agree", "{:.2%}"),
    ("tokens_per_s_b16", "tok/s b16", "{:,.0f}"),
    ("tokens_per_s_b16_turns", "tok/s b16, final forms in turns", "{:,.0f}"),
    ("texts_per_s_b16", "texts/s b16", "{:,.1f}"),
    ("tokens_per_s_b32", "tok/s b32", "{:,.0f}"),
    ("texts_per_s_b32", "texts/s b32", "{:,.1f}"),
    ("latency_p50_ms", "p50 ms b1", "{:.1f}"),
    ("latency_p95_ms", "p95 ms b1", "{:.1f}"),
    ("latency_speedup_vs_first", "p50 b1 vs first", "{:.2f}x"),
    ("speedup", "speedup vs input", "{:.2f}x"),
    ("speedup_vs_first", "vs first stage", "{:.2f}x"),
    ("params", "params", "{:,.0f}"),
    ("size_mb", "disk MB", "{:.1f}"),
    ("peak_rss_mb", "peak RSS MB", "{:,.0f}"),
    ("threads", "threads", "{:.0f}"),
    ("padding_free", "padding-free", "{}"),
)


def _batch_one(row: dict) -> str:
    """ ", batch-1 p50 17.3 ms (5.80x quicker than the first stage)", or nothing if not timed."""
    if "latency_p50_ms" not in row:
        return ""
    ratio = row.get("latency_speedup_vs_first")
    against = f" ({ratio:.2f}x quicker than the first stage)" if ratio else ""
    return f", batch-1 p50 {row['latency_p50_ms']:.1f} ms{against}"


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        "# Compression report\n",
        f"{env['cpu']} ({env.get('cpu_capability', '?')}), {env['threads']} torch threads, torch {env['torch']}; "
        f"torch int8 activations: {env.get('int8_activation_codes', '?')}. "
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
    if any("val_acc_best" in row for row in report["stages"]):
        lines.append(
            "\nval acc (training): the best validation accuracy of the run that trained the stage, its "
            "metrics.json's val/acc_best. Choose between stages on it: the test columns are reported, not chosen on."
        )
    if "paired" in report:
        paired = report["paired"]
        lines.append(
            f"\nvs first: each stage against {paired['against']!r} on the same {paired['texts']} test texts, "
            f"text by text. Δacc is in accuracy points with its {paired['level']:.0%} paired bootstrap "
            f"interval ({paired['rounds']:,} resamples of the texts, seed {paired['seed']}); McNemar p is the "
            "exact two-sided test on the texts only one of the two gets right; agree is the share of "
            "identical predictions."
        )
    if "final_choice" in report:
        chosen = report["final_choice"]
        scores = ", ".join(f"{stage} {value:.4f}" for stage, value in chosen["among"].items())
        lines.append(
            f"\nThe final model is **{chosen['stage']}**, chosen on the validation split ({chosen['by']}: "
            f"{scores}); the quantized and deploy forms are made from it."
        )
    if "fastest_final" in report:
        best = report["fastest_final"]
        diff = ""
        if "vs_first_acc_diff" in best:
            diff = (
                f", {100 * best['vs_first_acc_diff']:+.2f} points against the first stage "
                f"({100 * best['vs_first_acc_diff_low']:+.2f} to {100 * best['vs_first_acc_diff_high']:+.2f})"
            )
        in_turns = ""
        if best.get("by") == "tokens_per_s_b16_turns":
            in_turns = (
                f"; chosen on the final forms timed in turns batch by batch, where it ran "
                f"{best['tokens_per_s_b16_turns']:,.0f} tokens/s (rounds "
                f"{best['tokens_per_s_b16_turns_min']:,.0f}-{best['tokens_per_s_b16_turns_max']:,.0f})"
            )
        lines.append(
            f"\nFastest form of the final model: **{best['stage']}**, {best[report['speed_key']]:,.0f} tokens/s "
            f"at batch 16 ({best['speedup_vs_first']:.2f}x the first stage), accuracy {100 * best['acc']:.2f}%"
            f"{diff}{_batch_one(best)}; among {', '.join(best['among'])}{in_turns}."
        )
        if "quickest_b1" in best:
            quick = best["quickest_b1"]
            lines.append(
                f"One text at a time, **{quick['stage']}** is quicker{_batch_one(quick)}, "
                f"accuracy {100 * quick['acc']:.2f}%."
            )
    if "quantize" in report:
        settings = ", ".join(f"{k}={v}" for k, v in report["quantize"].items())
        lines.append(f"\nQuantization settings: {settings}")
    if report["warnings"]:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"


def pareto_plot(rows: list[dict], path: Path, speed_key: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # points numbered in stage order, names in the legend: stage names written beside the points
    # overlapped once several stages landed close together (a 6-stage chain's 15- and 11-layer students)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.plot([r[speed_key] for r in rows], [r["acc"] * 100 for r in rows], color="0.8", lw=1, zorder=1)
    for i, row in enumerate(rows, 1):
        x, y = row[speed_key], row["acc"] * 100
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
