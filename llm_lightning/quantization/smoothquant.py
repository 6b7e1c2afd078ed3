"""`quantize.smoothquant_alpha: auto`: SmoothQuant's alpha picked on the validation split.

SmoothQuant's alpha trades activation range against weight range, and the best one differs
between models (the SmoothQuant paper picks different alphas for different model families): on
the 11-layer SmolLM2 student, int8 predictions that differ from fp32 on the 852 validation texts
went from 3 to 7 across alpha 0.3-0.7 (docs/BENCHMARKS.md, "Fused projections").
`auto` quantizes a copy with each candidate, compares its validation logits with the fp32 model's,
and keeps the alpha with the fewest changed predictions (ties: the smallest mean change in the
logit margin). It tunes on the validation split only, never the test split that reports use.
Intel Neural Compressor (and IPEX's autotune on top of it) offers the same global search over a
list of alphas, plus a per-layer one, judged by the quantization loss on calibration data; here
the judge is what the task reports: the predictions.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence

from torch import nn

from llm_lightning.data.agreement import agreement, closeness, logits
from llm_lightning.errors import UserError
from llm_lightning.quantization.settings import DEFAULT_CANDIDATES, candidates_problem, validation_problem

log = logging.getLogger(__name__)


def choose_alpha(
    model: nn.Module,
    quantize: Callable[[nn.Module, float], nn.Module],
    rows: list[list[int]],
    pad_id: int,
    candidates: Sequence[float] = DEFAULT_CANDIDATES,
) -> tuple[float, list[dict]]:
    """The candidate alpha whose int8 copy of `model` agrees best with it on `rows` (validation
    texts), and one result row per candidate. `quantize(copy, alpha)` quantizes a copy in place."""
    problems = [p for p in (validation_problem(len(rows)), candidates_problem(candidates)) if p]
    if problems:  # worded as check_settings words them
        raise UserError("\n".join(problems))
    # one line before the first pass and one after each candidate: minutes of work, shown as it goes
    log.info(
        "quantize.smoothquant_alpha=auto: the fp32 model's logits on %d validation texts, then %d candidates %s",
        len(rows),
        len(candidates),
        list(candidates),
    )
    reference = logits(model, rows, pad_id)
    results = []
    for i, alpha in enumerate(candidates, 1):
        got = logits(quantize(copy.deepcopy(model), float(alpha)), rows, pad_id)
        results.append({"alpha": float(alpha), **agreement(got, reference)})
        log.info("SmoothQuant alpha %.2f (%d of %d): %s", alpha, i, len(candidates), results[-1])
    best = min(results, key=closeness)
    log.info(
        "quantize.smoothquant_alpha=auto chose %.2f on %d validation texts (%d predictions changed)",
        best["alpha"],
        len(rows),
        best["flips"],
    )
    return best["alpha"], results
