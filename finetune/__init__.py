"""Fine-tuning: instruction (full and LoRA) and classification."""
