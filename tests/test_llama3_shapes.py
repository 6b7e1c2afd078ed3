"""A Llama-3-shaped checkpoint through `model=hf`: every finetune, prune, distill and CPU quantize
choice trains and exports a `model/` that plain transformers loads with the trained logits, or is
refused before the first step.

The checkpoint has what Llama-3 checkpoints have and the tiny test model does not: grouped-query
attention, an explicit `head_dim` (here heads * head_dim = 128 != hidden_size = 64, so nothing may
derive it from the width), llama3 rope scaling, tied embeddings, a causal-LM head (the classifier's
`score` is new) and a tokenizer with BOS added and no pad token.
"""

from __future__ import annotations

import json
from typing import ClassVar

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import open_dict
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from llm_lightning.errors import UserError
from llm_lightning.models.saved import load_saved
from llm_lightning.pruning import prunable_weights, sparsity_report
from llm_lightning.pruning.structured import check_width_args, valid_remove_heads
from llm_lightning.quantization.settings import QuantizationUnsupportedError
from llm_lightning.train import train
from tests.conftest import make_cfg

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 64, 8, 2, 16
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
# Fast and exact: no checkpoints, logger or test pass; fp32 so the exported logits can match.
FAST = ["callbacks=none", "~logger", "runtime.threads=1", "precision=32-true", "test=false"]
# The stage report still runs; it need not time much.
QUICK_BENCH = [
    "bench=quick",
    "bench.batch_sizes=[16]",
    "bench.throughput_texts=8",
    "bench.latency_texts=2",
]
TEXTS = ["a gorgeous, moving film", "dull", "the plot never lands at all"]


class StepSpy(Callback):
    """The optimizer steps a run began: empty for a setting refused before training."""

    steps: ClassVar[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        StepSpy.steps.append(trainer.global_step)


def llama3_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE like Llama 3's: BOS prepended, EOS defined, no pad token."""
    vocab = {t: i for i, t in enumerate([BOS, EOS, *sorted(pre_tokenizers.ByteLevel.alphabet())])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama3") / "checkpoint"
    tokenizer = llama3_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        rope_scaling=ROPE,
        tie_word_embeddings=True,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    saved = json.loads((path / "config.json").read_text())
    assert saved["head_dim"] * saved["num_attention_heads"] != saved["hidden_size"]
    assert saved.get("pad_token_id") is None and AutoTokenizer.from_pretrained(path).pad_token is None
    return path


def run(out, checkpoint, *overrides: str):
    cfg = make_cfg(
        out,
        [
            "model=hf",
            f"model.name_or_path={checkpoint}",
            "model.attn_implementation=eager",
            *FAST,
            *overrides,
        ],
    )
    with open_dict(cfg):
        cfg.callbacks = {"spy": {"_target_": f"{__name__}.StepSpy"}}
    StepSpy.steps.clear()
    return train(cfg)


def exported_matches(out, trained) -> AutoModelForSequenceClassification:
    """`out/model` loads with plain transformers and gives the trained model's logits."""
    model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert tokenizer.pad_token == EOS and model.config.pad_token_id == 1  # the run chose EOS as pad
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()  # padded on the right: the pooled token must skip it
    with torch.no_grad():
        torch.testing.assert_close(model(**enc).logits, trained.eval()(**enc).logits, atol=1e-5, rtol=1e-4)
    config = model.config
    assert config.head_dim == HEAD_DIM and config.rope_parameters["rope_type"] == "llama3"
    return model


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, checkpoint):
    out = tmp_path_factory.mktemp("full")
    _, objects = run(out, checkpoint, "finetune=full")
    assert StepSpy.steps == [0, 1, 2, 3]
    return out, objects["module"].model


def test_full_finetune_exports_the_trained_model(full_run):
    out, trained = full_run
    model = exported_matches(out, trained)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (HEADS, KV_HEADS)


def lora_merged(model):
    assert not [k for k in model.state_dict() if "lora" in k]


def magnitude_half(model):
    assert sparsity_report(prunable_weights(model))["overall"] == pytest.approx(0.5, abs=2e-3)


def shape(layers: int, heads: int, kv_heads: int, intermediate: int = 128):
    def check(model):
        c = model.config
        assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (
            layers,
            heads,
            kv_heads,
        )
        assert c.intermediate_size == intermediate
        q = model.model.layers[0].self_attn.q_proj.weight
        assert q.shape == (heads * HEAD_DIM, HIDDEN)

    return check


STRUCTURED = ["prune=structured", "prune.mlp_sparsity=0.25", "prune.batches=2"]


@pytest.mark.parametrize(
    ("overrides", "check"),
    [
        pytest.param(["finetune=freeze", "finetune.trainable_layers=1"], shape(2, 8, 2), id="freeze"),
        pytest.param(
            ["finetune=gradual_unfreeze", "finetune.trainable_layers=1"],
            shape(2, 8, 2),
            id="gradual_unfreeze",
        ),
        pytest.param(["finetune=lora", "finetune.r=4"], lora_merged, id="lora"),
        pytest.param(
            ["prune=magnitude", "prune.sparsity=0.5", "prune.schedule.kind=one_shot"],
            magnitude_half,
            id="magnitude",
        ),
        # one query head of each group kept: 4 heads, 64 = 4 * 16 wide
        pytest.param([*STRUCTURED, "prune.remove_heads=4"], shape(2, 4, 2, 96), id="structured-query"),
        # 2 heads of 16 in a 64-wide model: only the explicit head_dim in config.json says so
        pytest.param([*STRUCTURED, "prune.remove_heads=6"], shape(2, 2, 2, 96), id="structured-query-narrow"),
        pytest.param(
            [*STRUCTURED, "prune.remove_heads=4", "prune.heads_mode=kv_group"],
            shape(2, 4, 1, 96),
            id="structured-kv_group",
        ),
        pytest.param(["prune=depth", "prune.remove_layers=1", "prune.batches=2"], shape(1, 8, 2), id="depth"),
    ],
)
def test_each_method_trains_and_exports_a_loadable_model(tmp_path, checkpoint, overrides, check):
    _, objects = run(tmp_path, checkpoint, *overrides)
    assert StepSpy.steps == [0, 1, 2, 3]
    check(exported_matches(tmp_path, objects["module"].model))


def test_distilling_a_run_of_the_checkpoint(tmp_path, checkpoint, full_run):
    teacher_out, _ = full_run
    _, objects = run(
        tmp_path,
        checkpoint,
        "distill=kd",
        f"distill.teacher={teacher_out / 'model'}",
        "distill.student.num_layers=1",
        f"distill.cache.dir={tmp_path / 'cache'}",
    )
    assert StepSpy.steps == [0, 1, 2, 3]
    model = exported_matches(tmp_path, objects["module"].model)
    assert model.config.num_hidden_layers == 1 and model.config.distilled_from["keep_layers"] == [1]


@pytest.mark.parametrize(
    "overrides",
    [
        # Symmetric activations: the default asymmetric path multiplies by oneDNN's packed int8
        # weight, which is off by ~0.5 per output on CPUs without VNNI (AVX2 only; reported to
        # the lead), whatever the shapes. compile=false: compiling takes minutes on two cores.
        pytest.param(
            ["quantize=int8_dynamic", "quantize.activations=symmetric", "quantize.smoothquant_alpha=0.5"],
            id="int8_dynamic",
        ),
        pytest.param(["quantize=int8_weight_only"], id="int8_weight_only"),
    ],
)
def test_cpu_quantization_after_training(tmp_path, checkpoint, overrides):
    metrics, objects = run(tmp_path, checkpoint, *overrides, "quantize.compile=false", *QUICK_BENCH)
    assert StepSpy.steps == [0, 1, 2, 3]
    fp32 = exported_matches(tmp_path, objects["module"].model)
    quantized, tokenizer, names = load_saved(tmp_path / "quantized")
    assert names == ["negative", "positive"] and quantized.config.head_dim == HEAD_DIM
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        want, got = fp32(**enc).logits, quantized(**enc).logits
    # int8 rounding moves these logits by 1-2% of their size; a wrong head layout by far more
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert 0.0 <= metrics["quantize/acc"] <= 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="int4 weight-only runs where CUDA is present")
def test_int4_on_cpu_is_refused_before_training(tmp_path, checkpoint):
    with pytest.raises(
        QuantizationUnsupportedError,
        match=r"int4_weight_only.*cannot run on this platform.*quantize=int8_dynamic",
    ):
        run(tmp_path, checkpoint, "quantize=int4_weight_only")
    assert StepSpy.steps == [] and not (tmp_path / "model").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param(
            ["prune.remove_heads=2"],
            r"remove_heads=2 \(heads_mode=query\) would leave 6 query heads and 2 KV heads.*"
            r"transformers .* refuses \(The hidden size \(64\) is not a multiple of the number of "
            r"attention heads \(6\)\).*Valid prune.remove_heads for heads_mode=query: \[0, 4, 6\]; "
            r"with prune.heads_mode=kv_group: \[0, 4\]",
            id="query-heads-transformers-refuses",
        ),
        pytest.param(
            ["prune.remove_heads=2", "prune.heads_mode=kv_group"],
            r"remove_heads=2 breaks the GQA grouping.*group size 4. Valid: \[0, 4\]",
            id="kv_group-not-whole-groups",
        ),
    ],
)
def test_head_counts_that_cannot_be_exported_are_refused_before_training(
    tmp_path, checkpoint, overrides, message
):
    with pytest.raises(UserError, match=message):
        run(tmp_path, checkpoint, *STRUCTURED, *overrides)
    assert StepSpy.steps == [] and not (tmp_path / "model").exists()


@pytest.mark.parametrize("heads_mode", ["query", "kv_group"])
def test_valid_head_counts_are_exactly_those_transformers_saves_and_loads(tmp_path, heads_mode):
    """Llama-3.2-1B's attention (2048 wide, 32 heads of 64, 8 KV heads), config only: removing 8
    query heads (one per KV group) leaves 24, which transformers refuses, as the issue found."""
    config = LlamaConfig(
        vocab_size=16,
        hidden_size=2048,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        rope_scaling=ROPE,
        tie_word_embeddings=True,
    )
    valid = valid_remove_heads(config, heads_mode)
    step = 8 if heads_mode == "query" else 4
    for remove in range(0, 32, step):
        heads = 32 - remove
        kv = 8 if heads_mode == "query" else heads // 4
        try:  # the round trip an exported model/ goes through
            pruned = LlamaConfig(
                **{**config.to_dict(), "num_attention_heads": heads, "num_key_value_heads": kv}
            )
            pruned.save_pretrained(tmp_path / f"{heads_mode}{remove}")
            loaded = AutoConfig.from_pretrained(tmp_path / f"{heads_mode}{remove}")
            works = (loaded.num_attention_heads, loaded.head_dim) == (heads, 64)
        except Exception:
            works = False
        assert (remove in valid) == works, (remove, valid)
        if remove not in valid:
            with pytest.raises(UserError, match=rf"remove_heads={remove} .*would not load"):
                check_width_args(config, 0.0, remove, heads_mode)
    assert valid == ([0, 16, 24] if heads_mode == "query" else [0, 16, 24, 28])


def test_the_packed_openvino_graph_takes_llama3_shapes(full_run, tmp_path):
    """The exported packed graph on GQA, an explicit head_dim and llama3 rope scaling: fp32 gives
    torch's logits, and int8 picks its SmoothQuant alpha on validation texts."""
    from omegaconf import OmegaConf

    from llm_lightning.runtimes.build import export_runtime

    out, _ = full_run
    model, tokenizer, _ = load_saved(out / "model")
    texts = [f"{t} number {i}" for i in range(8) for t in TEXTS]
    fp32 = export_runtime(model, tokenizer, "openvino", tmp_path / "fp32", texts, 64)
    exported, tokenizer, names = load_saved(fp32)
    assert names == ["negative", "positive"] and exported.config.head_dim == HEAD_DIM
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(exported(**enc).logits, model.eval()(**enc).logits, atol=1e-4, rtol=1e-3)
    settings = OmegaConf.create(
        {"smooth_quant_alpha": "auto", "smooth_quant_candidates": [0.5, 0.95], "calibration_texts": 8}
    )
    int8 = export_runtime(
        model, tokenizer, "openvino_int8", tmp_path / "int8", texts, 64, settings, val_texts=texts[8:]
    )
    meta = json.loads((int8 / "runtime.json").read_text())
    assert [r["alpha"] for r in meta["smooth_quant_choice"]["candidates"]] == [0.5, 0.95]
    assert meta["smooth_quant_alpha"] in (0.5, 0.95) and meta["smooth_quant_choice"]["validation_texts"] == 16
    # NNCF's accuracy control on the same shapes: no validation prediction of fp32 torch may change
    control = OmegaConf.create(
        {"smooth_quant_alpha": -1, "max_changed_predictions": 1 / 32, "calibration_texts": 8}
    )
    kept = export_runtime(
        model, tokenizer, "openvino_int8", tmp_path / "ac", texts, 64, control, val_texts=texts[8:]
    )
    record = json.loads((kept / "runtime.json").read_text())["accuracy_control"]
    controlled, *_ = load_saved(kept)
    val = tokenizer(texts[8:], padding=True, return_tensors="pt")
    with torch.no_grad():
        same = (controlled(**val).logits.argmax(-1) == model(**val).logits.argmax(-1)).float().mean()
    assert record["met"] and record["validation_texts"] == 16 and float(same) == record["kept"] == 1.0


def test_the_onnx_graph_takes_llama3_shapes_with_its_norms_fused(full_run, tmp_path):
    """The packed ONNX export on GQA, an explicit head_dim and llama3 rope scaling: torch's logits,
    and every RMSNorm in the form ONNX Runtime fuses into one kernel."""
    import onnx
    import onnxruntime as ort

    from llm_lightning.runtimes.build import export_runtime

    out, _ = full_run
    model, tokenizer, _ = load_saved(out / "model")
    texts = [f"{t} number {i}" for i in range(4) for t in TEXTS]
    folder = export_runtime(model, tokenizer, "onnx", tmp_path / "fp32", texts, 64)
    exported, tokenizer, _ = load_saved(folder)
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(exported(**enc).logits, model.eval()(**enc).logits, atol=1e-4, rtol=1e-3)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    fused = ops.count("SimplifiedLayerNormalization") + ops.count("SkipSimplifiedLayerNormalization")
    assert fused == 2 * model.config.num_hidden_layers + 1 and "Pow" not in ops
