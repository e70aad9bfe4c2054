"""Kettle's GPT: model, tokenizers, checkpoints, generation."""
