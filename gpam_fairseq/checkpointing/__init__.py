"""Loading and saving: checkpoints read safely and diagnosed, atomic saves, averaging, fine-tuning
from stock checkpoints."""
