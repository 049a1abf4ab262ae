"""Hugging Face checkpoints: the MoE architecture table, config.json's checks, safetensors reading and writing,
MXFP4 experts, the lazy checkpoint, and the tiny seeded model the demo and the tests build."""
