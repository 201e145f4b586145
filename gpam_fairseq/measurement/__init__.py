"""Measurement: rank collapse and gradients, kernel and saved-bytes counting, peak memory."""
