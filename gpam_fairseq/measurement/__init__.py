"""Measurement: rank collapse and gradients, kernel and saved-bytes counting, peak memory, benchmarks
(kernels, speed, memory, fairseq-train words/s), the GPU checks and the cost of the tensorboard scalars."""
