"""GGUF files: every mc.* key (keys.py), the per-expert layout (layout.py), streaming writes (write.py),
reading and metadata edits (edit.py), HF -> GGUF conversion (convert.py, with metadata.py for the
hyper-parameters and vocabulary), inspection, regrouping."""
