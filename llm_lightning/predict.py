"""Label texts with a saved model: one JSON line per text with the label and all probabilities.

    python -m llm_lightning.predict model_path=outputs/sentiment/<date>/<time>/model 'text="a gorgeous, moving film"'
    python -m llm_lightning.predict model_path=outputs/.../model 'text=["a gorgeous film","dull"]'
    python -m llm_lightning.predict model_path=outputs/.../model file=reviews.txt   # one text per line

The settings are conf/predict.yaml's (Hydra): `text`, `file`, `encoding`, `batch_size`, `max_length`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, ListConfig

from llm_lightning.data.batching import run_by_length
from llm_lightning.data.readers import decode
from llm_lightning.errors import MissingFileError, UserError
from llm_lightning.models.saved import load_saved
from llm_lightning.runtime import apply_runtime, run_entry, user_errors

WINDOW_BATCHES = 32  # batches sorted together: more sorts better, fewer shows results sooner


def predict(
    model, tokenizer, names: list[str], texts: list[str], batch_size: int = 32, max_length: int = 512
) -> Iterator[dict]:
    """One row per text, in the order given.

    The texts are labelled in windows of `batch_size * WINDOW_BATCHES`; within a window, batches
    are made of texts of similar length, so they carry little padding (on Rotten Tomatoes test
    texts at batch 16, sorted batches ran 1.6x faster than the given order, fp32 and int8 alike:
    docs/BENCHMARKS.md, "The chain's speed-up measured side by side"). A window's rows are
    printed when the window is done.
    """
    model.eval()

    def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask).logits.float().softmax(-1)

    window = batch_size * WINDOW_BATCHES
    for start in range(0, len(texts), window):
        chunk = texts[start : start + window]
        rows = tokenizer(chunk, truncation=True, max_length=max_length)["input_ids"]
        with torch.inference_mode():  # right-padded with the model's pad token, as load_saved sets it
            probs = run_by_length(rows, batch_size, tokenizer.pad_token_id, forward)
        for text, p in zip(chunk, probs, strict=True):
            yield {
                "text": text,
                "label": names[int(p.argmax())],
                "probs": {n: round(float(x), 6) for n, x in zip(names, p, strict=True)},
            }


def read_texts(path: str, encoding: str = "utf-8") -> list[str]:
    """The non-blank lines of `path` ('-': stdin), each a text."""
    if path == "-":
        stream: Iterable[str] = sys.stdin
    else:
        file = Path(path).expanduser()
        if not file.is_file():
            raise MissingFileError(f"file={path}: no such file (one text per line, or '-' for stdin).")
        stream = decode(file.read_bytes(), file, encoding, key="encoding").splitlines()
    return [line.rstrip("\n") for line in stream if line.strip()]


def given_texts(text) -> list[str]:
    """`text` as a list of texts: one, a list, or none (null). Hydra reads an unquoted `42` or
    `true` as a number or a boolean: each is labelled as written back, `str()`."""
    if text is None:
        return []
    return [str(t) for t in (text if isinstance(text, ListConfig | list) else [text])]


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
@user_errors
def main(cfg: DictConfig) -> None:
    texts = given_texts(cfg.text) + (read_texts(str(cfg.file), cfg.encoding) if cfg.file else [])
    if not texts:
        raise UserError(
            'predict has no texts: give \'text="..."\' (or a list, \'text=["...","..."]\') or file=FILE '
            "(one text per line, '-' for stdin)."
        )
    apply_runtime(cfg.runtime)
    model, tokenizer, names = load_saved(cfg.model_path)
    for row in predict(model, tokenizer, names, texts, cfg.batch_size, cfg.max_length):
        print(json.dumps(row, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    run_entry(main)
