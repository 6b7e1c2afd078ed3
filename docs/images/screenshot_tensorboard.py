"""Screenshot TensorBoard's Time Series dashboard for the README, with headless Chromium.

    python docs/images/screenshot_tensorboard.py --logdir outputs/distill --runs '^(kd|nokd)-depth15-3ep/' \
        --tags '^(train/(loss|ce|kd)_step|val/(acc|loss|f1_macro))$' --smoothing 0.6 \
        --out docs/images/tensorboard.png

Needs `chromium` on PATH and nothing else: Chromium is driven over `--remote-debugging-pipe`
(DevTools JSON messages on fds 3/4), so no websocket package or Playwright is required.
Headless Chromium has no WebGL here, so the charts are forced to SVG with TensorBoard's
`forceSVG` URL flag; the dashboard settings (closed settings pane, smoothing, full y range) go
into localStorage before TensorBoard's scripts run.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

# TensorBoard reads these from localStorage["_tb_global_settings"] (keys as in its webfiles.zip).
DASHBOARD_SETTINGS = {
    "timeSeriesSettingsPaneOpened": False,  # the pane would take a third of the picture
    "ignoreOutliers": False,  # show the whole loss range, not a clipped one
    "stepSelectorEnabled": False,  # no data table under each card: more cards fit
    "autoReload": False,
}


class DevTools:
    """Minimal Chrome DevTools Protocol client over Chromium's --remote-debugging-pipe."""

    def __init__(self, chromium: str, flags: list[str]):
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def wire_fds() -> None:  # Chromium reads commands on fd 3 and writes replies on fd 4
            # Copy out of the way first: a pipe end may already be fd 3 or 4.
            read_end, write_end = os.dup(to_child_r), os.dup(from_child_w)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        self.proc = subprocess.Popen(
            [chromium, "--remote-debugging-pipe", *flags],
            preexec_fn=wire_fds,
            close_fds=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._buffer = b""
        self._next_id = 0
        self.session: str | None = None

    def call(self, method: str, timeout: float = 30.0, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while b"\0" not in self._buffer:
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium exited while waiting for {method}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
        raise TimeoutError(f"{method} got no reply within {timeout:.0f}s")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        os.close(self._to_child)
        os.close(self._from_child)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tensorboard(logdir: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            logdir,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(60):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=1)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"TensorBoard did not start on port {port} for --logdir {logdir}")


def count_chart_lines(tools: DevTools) -> int:
    script = "document.querySelectorAll('line-chart svg path').length"
    return tools.call("Runtime.evaluate", expression=script, returnByValue=True)["result"]["value"]


def screenshot(args: argparse.Namespace) -> None:
    chromium = shutil.which(args.chromium)
    if chromium is None:
        raise SystemExit(f"Chromium not found as {args.chromium!r}; pass --chromium /path/to/chromium")
    port = free_port()
    tensorboard = start_tensorboard(args.logdir, port)
    profile = tempfile.mkdtemp(prefix="tb-shot-")
    query = {"forceSVG": "true", "smoothing": str(args.smoothing), "tagFilter": args.tags}
    if args.runs:
        query["runFilter"] = args.runs
    url = f"http://127.0.0.1:{port}/?{urllib.parse.urlencode(query)}#timeseries"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}"]
    tools = DevTools(chromium, flags)
    try:
        target = tools.call("Target.createTarget", url="about:blank")["targetId"]
        tools.session = tools.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        tools.call(
            "Emulation.setDeviceMetricsOverride",
            width=args.width,
            height=args.height,
            deviceScaleFactor=1,
            mobile=False,
        )
        tools.call("Page.enable")  # without it the script below never runs
        settings = json.dumps(json.dumps(DASHBOARD_SETTINGS))
        tools.call(
            "Page.addScriptToEvaluateOnNewDocument",
            source=f"localStorage.setItem('_tb_global_settings', {settings});",
        )
        tools.call("Page.navigate", url=url)
        # Charts appear once the run list and every card's scalars have been fetched.
        deadline = time.monotonic() + args.wait
        while time.monotonic() < deadline and count_chart_lines(tools) == 0:
            time.sleep(1)
        time.sleep(3)  # the last cards' data and axis labels
        if count_chart_lines(tools) == 0:
            raise RuntimeError(f"No chart lines rendered after {args.wait}s; is {url} showing any run?")
        png = tools.call("Page.captureScreenshot", format="png")["data"]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_bytes(base64.b64decode(png))
        print(f"{args.out} ({args.out.stat().st_size / 1024:.0f} KB) from {url}")
    finally:
        tools.close()
        tensorboard.terminate()
        tensorboard.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--logdir", required=True, help="passed to tensorboard --logdir")
    parser.add_argument("--runs", default="", help="run filter regex (TensorBoard's run search box)")
    parser.add_argument("--tags", default="^(train/loss_step|val/acc)$", help="tag filter regex")
    parser.add_argument("--smoothing", type=float, default=0.6, help="scalar smoothing, 0 to 0.99")
    parser.add_argument("--out", type=Path, default=Path("docs/images/tensorboard.png"))
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--wait", type=float, default=40.0, help="seconds to wait for the charts")
    parser.add_argument("--chromium", default="chromium")
    screenshot(parser.parse_args())


if __name__ == "__main__":
    main()
