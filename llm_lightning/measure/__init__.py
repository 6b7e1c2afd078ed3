"""How models are measured and compared: the bench (accuracy, latency, throughput, memory),
padding-free batches, the compile helper, paired statistics, the training run's TensorBoard
summary and the per-stage report."""
