"""Methods: the linear probe (fast path) and the training engine (fine-tuning, LoRA)."""
