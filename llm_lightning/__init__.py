"""Fine-tune, distil, prune and quantize a Llama sequence classifier with Lightning + Hydra."""

__version__ = "0.1.0"
