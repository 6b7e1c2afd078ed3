"""Post-training quantization: settings (every check in one place), the torchao path, SmoothQuant,
activation centring, oneDNN int8 packing, fused projections and the saved `quantized/` format."""
