"""What every runtime folder shares: the tokenizer, labels, runtime.json, the README snippet, and a
torch-shaped wrapper so that the project's bench measures a runtime like any other model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer
from transformers.modeling_outputs import SequenceClassifierOutput

from llm_lightning.artifacts import atomic_dir, write_json
from llm_lightning.data.batching import right_padded
from llm_lightning.runtimes import RUNTIME_FILE

SNIPPET = """# {title}

Runs with only `{runtime}` and `tokenizers` installed (`pip install {pip} tokenizers numpy`):

```python
import json, numpy as np
from tokenizers import Tokenizer
{import_line}
meta = json.load(open("runtime.json"))
tokenizer = Tokenizer.from_file("tokenizer.json")
tokenizer.enable_truncation(meta["max_length"])
tokenizer.enable_padding(pad_id=meta["pad_token_id"])  # right padding: the model pools the last real token
{load_line}
texts = ["A moving, funny and beautifully acted film.", "Dull, and far too long."]
batch = tokenizer.encode_batch(texts)
ids = np.array([b.ids for b in batch], dtype=np.int64)
mask = np.array([b.attention_mask for b in batch], dtype=np.int64)
{run_line}
print([meta["labels"][i] for i in logits.argmax(-1)])
```
"""


def snippet_code(readme: str) -> str:
    """The Python block of a folder's README (what the deploy tests run on their own)."""
    return readme.split("```python\n", 1)[1].split("```", 1)[0]


def write_folder(
    target: Path,
    model: nn.Module,
    tokenizer,
    meta: dict,
    write_model: Callable[[Path], None],
    readme: dict,
    training: dict | None,
) -> Path:
    """Write a runtime folder atomically: `write_model(tmp)` adds the model file(s)."""
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    meta = {**meta, "labels": labels, "pad_token_id": int(tokenizer.pad_token_id)}

    def write(tmp: Path) -> None:
        write_model(tmp)
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / RUNTIME_FILE, meta)
        (tmp / "README.md").write_text(SNIPPET.format(**readme))
        if training is not None:
            write_json(tmp / "training.json", training)

    return atomic_dir(target, write)


class RuntimeClassifier(nn.Module):
    """A classifier that runs in another runtime, called like a transformers one.

    `run(input_ids, attention_mask)` takes and returns numpy arrays; `parameter_count` is the
    exported graph's weight count (the bench's `params`), since the weights are not torch tensors.
    """

    def __init__(
        self,
        path: Path,
        meta: dict,
        run: Callable[[np.ndarray, np.ndarray], np.ndarray],
        parameter_count: int,
    ):
        super().__init__()
        self.config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        self.meta, self.run, self.parameter_count = meta, run, int(parameter_count)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SequenceClassifierOutput:
        logits = self.run(input_ids.numpy().astype(np.int64), attention_mask.numpy().astype(np.int64))
        return SequenceClassifierOutput(logits=torch.from_numpy(np.asarray(logits, dtype=np.float32)))


def tokenizer_of(path: Path):
    """The folder's tokenizer, right-padded with a pad token: the classifier pools the last real token."""
    return right_padded(AutoTokenizer.from_pretrained(path, trust_remote_code=False))


class Traceable(nn.Module):
    """`(input_ids, attention_mask) -> logits`: the signature both exporters trace."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def example_inputs(tokenizer, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A right-padded batch of two rows of different lengths (the shortest and longest of `texts`),
    so that the traced graph sees padding and keeps batch and sequence dynamic."""
    rows = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    by_length = {len(r): text for r, text in zip(rows, texts, strict=True)}
    if len(by_length) < 2:
        raise ValueError("example_inputs needs two texts of different token lengths")
    two = [by_length[min(by_length)], by_length[max(by_length)]]
    enc = tokenizer(two, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]
