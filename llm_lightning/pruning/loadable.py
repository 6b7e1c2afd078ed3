"""Would transformers save and load a model config once pruning has changed it?

Pruning changes `model.config` by setting attributes, and setting an attribute runs no
cross-field check; `save_pretrained` and `from_pretrained` do (transformers 5 configs are
huggingface_hub strict dataclasses with `validate_*` methods). A shape transformers refuses would
train for the whole run and then fail at export, so pruning asks these questions in `setup`,
before the first step.

For example transformers 5.24's `LlamaConfig.validate_architecture` requires
`hidden_size % num_attention_heads == 0` even when `head_dim` is explicit: Llama-3.2-1B (2048
wide, 32 heads, 8 KV heads) minus one query head per KV group (24 heads) is refused.
"""

from __future__ import annotations

import copy

import transformers

from llm_lightning.errors import UserError


def config_refusal(config, **changes) -> str | None:
    """Why transformers would refuse `config` with `changes` set, or None if it accepts it.

    The same validators run in `save_pretrained` and in `from_pretrained`. Configs without a
    `validate` method (transformers 4) check nothing, so nothing is refused.
    """
    trial = copy.deepcopy(config)
    for key, value in changes.items():
        setattr(trial, key, value)
    validate = getattr(trial, "validate", None)
    if validate is None:
        return None
    # huggingface_hub raises a StrictDataclassError (not a ValueError) around the validator's own error
    try:
        validate()
    except Exception as e:
        return str(e.__cause__ or e).strip().rstrip(".")
    return None


def check_saveable(config, setting: str) -> None:
    """Refuse, before training, a pruned config that `save_pretrained` would refuse at export."""
    refusal = config_refusal(config)
    if refusal:
        raise UserError(
            f"{setting} gives a model config that transformers {transformers.__version__} refuses "
            f"({refusal}): the run would train and then fail to save model/ (save_pretrained), and "
            "the saved model would not load (from_pretrained). Choose a smaller cut in `prune=`."
        )
