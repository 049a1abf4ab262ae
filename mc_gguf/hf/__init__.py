"""Hugging Face checkpoints: the MoE architecture table, lazy safetensors reading, and the tiny seeded
model the demo and the tests build."""
