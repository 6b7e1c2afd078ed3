"""Fine-tune, distil, prune and quantize a Llama sequence classifier with Lightning + Hydra."""

import logging

__version__ = "0.1.0"

# torchao's wheel carries kernels built for CUDA only (mxfp8, cutlass for sm90a) and, on every
# import, warns "Failed to load <file>.so" for each when torch is a CPU build, which can never load
# them. transformers imports torchao as it starts, so every command began with two lines that read
# like an error and are not one. Only those lines are dropped, and only on a CPU build of torch;
# anything else torchao says still shows.
CUDA_ONLY_KERNELS = ("_C_mxfp8", "_C_cutlass")


def _cpu_build_cannot_load(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    if not message.startswith("Failed to load") or not any(k in message for k in CUDA_ONLY_KERNELS):
        return True
    import torch  # already imported: torchao imports it before it logs this

    return torch.version.cuda is not None


logging.getLogger("torchao").addFilter(_cpu_build_cannot_load)
