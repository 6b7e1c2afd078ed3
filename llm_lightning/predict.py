"""Label texts with a saved model: one JSON line per text with the label and all probabilities.

python -m llm_lightning.predict outputs/sentiment/<date>/<time>/model "a gorgeous, moving film" "dull"
python -m llm_lightning.predict outputs/.../model --file reviews.txt   # one text per line
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from llm_lightning.models.saved import load_saved


def predict(
    model, tokenizer, names: list[str], texts: list[str], batch_size: int = 32, max_length: int = 512
) -> Iterator[dict]:
    model.eval()
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.inference_mode():
            probs = model(**enc).logits.float().softmax(-1)
        for text, p in zip(chunk, probs, strict=True):
            yield {
                "text": text,
                "label": names[int(p.argmax())],
                "probs": {n: round(float(x), 6) for n, x in zip(names, p, strict=True)},
            }


def read_texts(path: str) -> list[str]:
    stream: Iterable[str] = sys.stdin if path == "-" else Path(path).read_text(encoding="utf-8").splitlines()
    return [line.rstrip("\n") for line in stream if line.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m llm_lightning.predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="a run's model/ folder or a checkpoint (.ckpt)")
    parser.add_argument("texts", nargs="*", help="texts to label")
    parser.add_argument("--file", help="a file with one text per line ('-' for stdin)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args(argv)
    texts = list(args.texts) + (read_texts(args.file) if args.file else [])
    if not texts:
        parser.error("give texts as arguments or --file FILE")
    model, tokenizer, names = load_saved(args.model)
    for row in predict(model, tokenizer, names, texts, args.batch_size, args.max_length):
        print(json.dumps(row, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
