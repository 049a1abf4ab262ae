"""Hugging Face checkpoints: the MoE architecture table, lazy safetensors reading, GGUF metadata from
config and tokenizer, and the tiny seeded model the demo and the tests build."""
