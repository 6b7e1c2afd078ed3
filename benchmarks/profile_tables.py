"""cProfile's self time per package and per function, in ms per step, as Markdown tables.

Imported as a sibling module (`from profile_tables import ...`; benchmarks/lightning_overhead.py).
"""

from __future__ import annotations

import cProfile
import pstats
from pathlib import Path


def package(path: str) -> str:
    """Where a profiled function lives: a site-packages package, `llm_lightning.<subpackage>`, ..."""
    if path.startswith(("~", "<")):
        return "C functions and builtins (torch kernels included)"
    parts = Path(path).parts
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1].removesuffix(".py")
    if "llm_lightning" in parts:
        return ".".join(parts[parts.index("llm_lightning") : -1][:2])
    return "standard library, this script"


def model_side(name: str) -> bool:
    """The model's own work, which a plain training loop does too: torch, transformers, C calls."""
    return name.startswith("C functions") or name in ("torch", "transformers")


def print_profile(profiler: cProfile.Profile, wall_s: float, steps: int, what: str, top: int = 15) -> None:
    """Self time per package, then the `top` functions outside the model's side, of a profiled
    `what` that ran `steps` steps in `wall_s` seconds."""
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, ncalls, self, cumulative, callers)}
    per_step = 1000 / steps
    by_package: dict[str, float] = {}
    for (path, _, _), (_, _, self_s, _, _) in stats.items():
        by_package[package(path)] = by_package.get(package(path), 0.0) + self_s * per_step
    outside = sum(ms for name, ms in by_package.items() if not model_side(name))
    print(
        f"\ncProfile of {what}: {wall_s * per_step:.1f} ms/step (profiled), of which "
        f"{outside:.1f} ms in Python outside torch, transformers and C calls"
    )
    print("| package | self time ms/step |\n|---|---|")
    for name, ms in sorted(by_package.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {ms:.2f} |")
    own = sorted(
        ((k, v) for k, v in stats.items() if not model_side(package(k[0]))), key=lambda kv: -kv[1][2]
    )
    print(f"\nTop {top} of those functions, by self time\n| function | calls/step | ms/step |\n|---|---|---|")
    for (path, line, name), (_, calls, self_s, _, _) in own[:top]:
        where = f"{package(path)}: {Path(path).name}:{line} {name}"
        print(f"| {where} | {calls * per_step / 1000:.1f} | {self_s * per_step:.3f} |")
