"""Sweeps as a user runs them (`python -m llm_lightning.train -m ...`), and one TensorBoard over them."""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import run_module

QUICK = ["model=tiny", "debug=smoke", "callbacks.progress_bar=null", "export=false"]


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("grid")
    done = run_module("llm_lightning.train", "-m", *QUICK, "finetune=full,lora", f"hydra.sweep.dir={out}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout


def test_grid_sweep_runs_each_job_in_its_own_dir_and_summarises(grid_sweep):
    out, stdout = grid_sweep
    for job, method in (("0", "full"), ("1", "lora")):
        assert OmegaConf.load(out / job / ".hydra" / "config.yaml").finetune.method == method
        assert (out / job / "checkpoints" / "last.ckpt").exists()
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ["0", "1"]
    common = " ".join(QUICK).replace("export=false", "export=False")
    assert [r["overrides"] for r in rows] == [f"{common} finetune=full", f"{common} finetune=lora"]
    for row in rows:
        metrics = json.loads((out / row["job"] / "metrics.json").read_text())
        assert row["status"] == "done"
        for key in ("val/acc_best", "test/acc", "train/tokens_per_s"):
            assert float(row[key]) == pytest.approx(metrics[key]), key
    # trainable parameters differ between the methods, so the rows are not copies of one run
    assert rows[0]["train/trainable_params"] != rows[1]["train/trainable_params"]
    printed = [line for line in stdout.splitlines() if line.startswith("job ")]
    assert len(printed) == 2  # each with the override that sets it apart
    assert printed[0].endswith("| finetune=full") and printed[1].endswith("| finetune=lora")
    assert f"{out / 'sweep.csv'}" in stdout


def test_optuna_sweep_maximises_the_returned_metric(tmp_path):
    done = run_module(
        "llm_lightning.train",
        "hparams_search=sentiment_optuna",
        *QUICK,
        "test=false",
        "task.limit=8",
        "trainer.max_steps=1",
        "trainer.val_check_interval=1",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    best = OmegaConf.load(tmp_path / "optimization_results.yaml")
    scores = [json.loads((tmp_path / job / "metrics.json").read_text())["val/acc_best"] for job in ("0", "1")]
    assert best.best_value == pytest.approx(max(scores))
    assert set(best.best_params) == {
        "optimizer.lr",
        "optimizer.weight_decay",
        "scheduler.warmup_ratio",
        "finetune",
        "batch_size",
    }
    assert len(list(csv.DictReader(open(tmp_path / "sweep.csv")))) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, data: bytes | None = None):
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"} if data else {}
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


def test_tensorboard_serves_every_sweep_job_with_hparams(grid_sweep):
    out, _ = grid_sweep
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(out),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--load_fast=false",
            "--reload_interval=0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        runs = []
        for _ in range(120):  # TensorBoard loads the event files in the background
            try:
                runs = _get(f"{base}/data/runs")
            except OSError:
                runs = []
            if {"0/tensorboard", "1/tensorboard"} <= set(runs):
                break
            assert server.poll() is None, server.stderr.read()
            time.sleep(0.5)
        assert {"0/tensorboard", "1/tensorboard"} <= set(runs), runs
        for job in ("0", "1"):
            tags = _get(f"{base}/data/plugin/scalars/tags")[f"{job}/tensorboard"]
            assert {"val/acc", "val/acc_best", "train/loss_step"} <= set(tags)
            points = _get(f"{base}/data/plugin/scalars/scalars?run={job}/tensorboard&tag=val/acc_best")
            metrics = json.loads((out / job / "metrics.json").read_text())
            assert points[-1][2] == pytest.approx(metrics["val/acc_best"])  # [wall_time, step, value]
        request = json.dumps(
            {
                "experimentName": "",
                "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS"],
                "colParams": [],
                "startIndex": 0,
                "sliceSize": 10,
            }
        ).encode()
        groups = _get(f"{base}/data/plugin/hparams/session_groups", request)["sessionGroups"]
        methods = sorted(g["hparams"]["finetune/method"] for g in groups)
        assert methods == ["full", "lora"]
        for g in groups:
            assert any(m["name"]["tag"] == "val/acc_best" for m in g["metricValues"])
    finally:
        server.terminate()
        server.wait(timeout=20)
    assert server.returncode is not None
