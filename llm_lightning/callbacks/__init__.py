from llm_lightning.callbacks.finetune import GradualUnfreeze, LayerFreeze
from llm_lightning.callbacks.throughput import TokenThroughput

__all__ = ["GradualUnfreeze", "LayerFreeze", "TokenThroughput"]
