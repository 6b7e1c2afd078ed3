"""What the 7-bit activation codes of CPUs without VNNI cost in accuracy, on one quantized folder.

    flock /tmp/heavy.lock python benchmarks/activation_bits.py MODEL_DIR QUANTIZED_DIR

On CPUs without VNNI (AVX2) the centred int8 layers feed oneDNN 7-bit activation codes
(llm_lightning.quantization.onednn_int8): 8-bit ones saturate its int16 pair sums there, and
`torch._int_mm`, which takes them exactly, is a scalar loop 40-90x slower than fp32. This prices
the lost bit. Three models are scored on the validation and the test texts: MODEL_DIR (fp32), the
folder as this CPU runs it, and the same folder with 8-bit codes, their integer products computed
in float64 (exact: every sum stays far below 2^53), as a CPU with VNNI or AMX computes them. Each is
compared text by text with fp32 and the two codes with each other (paired bootstrap interval,
McNemar). Speed is not measured here: the float64 products are an emulation, not a kernel.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from compare import paired_cells
from omegaconf import OmegaConf

from llm_lightning.data import load_task
from llm_lightning.data.provenance import check_split
from llm_lightning.measure.bench import cpu_name, evaluate
from llm_lightning.models.saved import load_saved
from llm_lightning.quantization import centering
from llm_lightning.quantization.onednn_int8 import SIGNED_8, int8_codes_name
from llm_lightning.runtime import conf_dir


def exact_int8_products(rows: torch.Tensor, weight_t: torch.Tensor, row_scales: torch.Tensor) -> torch.Tensor:
    """`torchao.kernel.int_scaled_matmul` computed in float64: the integer products `_int_mm`
    gives, without its scalar loop."""
    return (rows.double() @ weight_t.double()).float() * row_scales


def with_eight_bit_codes(model: torch.nn.Module) -> int:
    """Make every centred layer of `model` quantize its activations to signed 8-bit codes and
    multiply them through `exact_int8_products`; return how many layers."""
    centred = [m for m in model.modules() if getattr(m, centering.CENTERED, False)]
    for module in centred:
        module.activation_codes = SIGNED_8
        module.packed_int8_weight = None  # the forward's torchao branch: centering._int_scaled_matmul
    centering._int_scaled_matmul = exact_int8_products
    return len(centred)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir", type=Path, help="the fp32 model/ folder the quantized one was made from")
    parser.add_argument("quantized_dir", type=Path, help="a quantize=int8_dynamic quantized/ folder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42, help="the training run's seed: the same splits")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = OmegaConf.load(conf_dir() / "task" / "sentiment.yaml")
    data = load_task(task, args.seed)
    for path in (args.model_dir, args.quantized_dir):
        check_split(path, task, args.seed, data)
    print(f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}; this CPU: {int8_codes_name()}")
    models = {"fp32": load_saved(args.model_dir)[:2], "this CPU's codes": load_saved(args.quantized_dir)[:2]}
    eight_bit = load_saved(args.quantized_dir)[:2]
    print(f"8-bit codes emulated in {with_eight_bit_codes(eight_bit[0])} layers")
    models["8-bit codes"] = eight_bit
    for split, texts in (("validation", data.val), ("test", data.test)):
        predictions = {}
        for name, (model, tokenizer) in models.items():
            rows = tokenizer(list(texts.texts), truncation=True, max_length=task.max_length)["input_ids"]
            with torch.inference_mode():
                got = evaluate(
                    model.eval(), rows, texts.labels, model.config.num_labels, 32, tokenizer.pad_token_id
                )
            predictions[name] = (got["acc"], got["predictions"])
            print(f"  {split}, {name}: acc {got['acc']:.4f}", flush=True)
        labels = list(texts.labels)
        print(f"\n{split} ({len(labels)} texts)\n")
        print("| model | acc | against | Δacc [95% CI] | McNemar p | agreement |\n|---|---|---|---|---|---|")
        for name, against in (
            ("this CPU's codes", "fp32"),
            ("8-bit codes", "fp32"),
            ("this CPU's codes", "8-bit codes"),
        ):
            acc, preds = predictions[name]
            cells = paired_cells(labels, predictions[against][1], preds)
            print(f"| {name} | {acc:.2%} | {against} | {cells} |")
        print()


if __name__ == "__main__":
    main()
