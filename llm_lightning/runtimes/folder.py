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
from llm_lightning.data.packing import pair_cost
from llm_lightning.runtimes import RUNTIME_FILE
from llm_lightning.runtimes.inputs import feed

SNIPPET = """# {title}

Runs with only `{runtime}` and `tokenizers` installed (`pip install {pip} tokenizers numpy`):

```python
import json, numpy as np
from tokenizers import Tokenizer
{import_line}
meta = json.load(open("runtime.json"))
tokenizer = Tokenizer.from_file("tokenizer.json")
tokenizer.enable_truncation(meta["max_length"])
{load_line}
texts = ["A moving, funny and beautifully acted film.", "Dull, and far too long.", "Loved it."]
{batch}
{run_line}
print([meta["labels"][i] for i in logits.argmax(-1)])
```
{notes}"""
BATCH = {
    "padded": """tokenizer.enable_padding(pad_id=meta["pad_token_id"])  # right padding: the model pools the last real token
batch = tokenizer.encode_batch(texts)
ids = np.array([b.ids for b in batch], dtype=np.int64)
mask = np.array([b.attention_mask for b in batch], dtype=np.int64)
inputs = {"input_ids": ids, "attention_mask": mask}""",
    # the packing of llm_lightning.data.packing, in numpy
    "packed": """tokenizer.no_padding()  # packed rows hold whole texts, no padding between them
rows = [e.ids for e in tokenizer.encode_batch(texts)]
width, lines = max(map(len, rows)), []  # rows of the graph: lists of texts side by side
for i in sorted(range(len(rows)), key=lambda i: -len(rows[i])):
    line = next((ln for ln in lines if sum(len(rows[j]) for j in ln) + len(rows[i]) <= width), None)
    if line is None:
        lines.append(line := [])
    line.append(i)
ids = np.full((len(lines), width), meta["pad_token_id"], dtype=np.int64)
positions, last = np.zeros_like(ids), np.zeros(len(rows), dtype=np.int64)
for r, line in enumerate(lines):
    at = 0
    for i in line:
        n = len(rows[i])
        ids[r, at : at + n], positions[r, at : at + n] = rows[i], np.arange(n)
        last[i], at = r * width + at + n - 1, at + n
    positions[r, at:] = np.arange(width - at)  # the row's padding: a text of its own
inputs = {"input_ids": ids, "position_ids": positions, "last": last}""",
}
NOTES = {
    "padded": "",
    "packed": """
The graph takes packed rows: several texts side by side in a row, each text's position ids counting
from 0 (that is how the graph keeps texts apart), and `last`, the flat index `row * width + column`
of each text's last token; it returns one row of logits per text, in the order of `last`. A padded
batch works too: position ids `0 .. width-1` in every row and `last = row * width + length - 1`.
Rows may be of any width: this snippet makes them as wide as the longest text; llm_lightning packs
into the width that costs least, often wider (fewer, fuller rows).
""",
}


def snippet_code(readme: str) -> str:
    """The Python block of a folder's README (what the deploy tests run on their own)."""
    return readme.split("```python\n", 1)[1].split("```", 1)[0]


def write_folder(
    target: Path,
    model: nn.Module,
    tokenizer,
    meta: dict,
    write_model: Callable[[Path], dict | None],
    readme: dict,
    training: dict | None,
) -> Path:
    """Write a runtime folder atomically: `write_model(tmp)` adds the model file(s) and returns what
    runtime.json should record of how they were made, if anything besides `meta`."""
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    meta = {**meta, "labels": labels, "pad_token_id": int(tokenizer.pad_token_id)}
    inputs = meta["inputs"]
    readme = {**readme, "batch": BATCH[inputs], "notes": NOTES[inputs] + readme.get("tip", "")}

    def write(tmp: Path) -> None:
        made = write_model(tmp) or {}
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / RUNTIME_FILE, {**meta, **made})
        (tmp / "README.md").write_text(SNIPPET.format(**readme))
        if training is not None:
            write_json(tmp / "training.json", training)

    return atomic_dir(target, write)


class RuntimeClassifier(nn.Module):
    """A classifier that runs in another runtime, called like a transformers one.

    `run(inputs)` takes the graph's named numpy inputs (llm_lightning.runtimes.inputs) and returns
    its logits; a padded batch is fed as the folder's graph takes it, packed where it is packed.
    `parameter_count` is the exported graph's weight count (the bench's `params`), since the weights
    are not torch tensors. `config`: the model's, for a graph not yet in a folder (`path` None).
    """

    def __init__(
        self,
        path: Path | None,
        meta: dict,
        run: Callable[[dict[str, np.ndarray]], np.ndarray],
        parameter_count: int,
        config=None,
    ):
        super().__init__()
        self.config = (
            config if config is not None else AutoConfig.from_pretrained(path, trust_remote_code=False)
        )
        self.path = Path(path) if path is not None else None
        self.meta, self.run, self.parameter_count = meta, run, int(parameter_count)
        self.inputs = meta.get("inputs", "padded")  # folders written before packed graphs are padded
        self.packs_batches = self.inputs == "packed"  # what the bench reports as padding-free
        self.pair_cost = pair_cost(self.config)  # packed rows of the cheapest width

    def feed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, np.ndarray]:
        """A padded batch as this folder's graph takes it (llm_lightning.runtimes.inputs.feed)."""
        return feed(
            input_ids.numpy(), attention_mask.numpy(), self.inputs, self.meta["pad_token_id"], self.pair_cost
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SequenceClassifierOutput:
        logits = self.run(self.feed(input_ids, attention_mask))
        return SequenceClassifierOutput(logits=torch.from_numpy(np.asarray(logits, dtype=np.float32)))


def tokenizer_of(path: Path):
    """The folder's tokenizer, right-padded with a pad token: the classifier pools the last real token."""
    return right_padded(AutoTokenizer.from_pretrained(path, trust_remote_code=False))
