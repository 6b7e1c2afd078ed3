"""Fine-tune, distil, prune and quantize a Llama sequence classifier with Lightning + Hydra."""

import logging

__version__ = "0.1.0"

# transformers imports torchao as it starts, and torchao's import said four things at the top of
# every command that read like errors, that no user can act on, and that are not ours to fix:
# - "Failed to load <file>.so", for each kernel its wheel builds for CUDA only (mxfp8, cutlass for
#   sm90a), when torch is a CPU build, which can never load them;
# - torch 2.13's note to torchao that registering its Enums with register_constant() is deprecated.
# Only these lines are dropped; anything else either logger says still shows.
CUDA_ONLY_KERNELS = ("_C_mxfp8", "_C_cutlass")
TORCHAO_ENUM_NOTE = "is an Enum subclass and is now natively supported by torch.compile"


def _not_a_cuda_only_kernel_on_a_cpu_build(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    if not message.startswith("Failed to load") or not any(k in message for k in CUDA_ONLY_KERNELS):
        return True
    import torch  # already imported: torchao imports it before it logs this

    return torch.version.cuda is not None


def _not_torchaos_enum_note(record: logging.LogRecord) -> bool:
    return TORCHAO_ENUM_NOTE not in record.getMessage()


logging.getLogger("torchao").addFilter(_not_a_cuda_only_kernel_on_a_cpu_build)
logging.getLogger("torch.utils._pytree").addFilter(_not_torchaos_enum_note)
