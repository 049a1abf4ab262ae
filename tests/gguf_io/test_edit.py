"""Metadata edits: the header-only path writes what gguf-py's full rewrite writes."""

from __future__ import annotations

import pytest

from mc_gguf.gguf_io import keys


def test_a_metadata_edit_that_fits_rewrites_only_the_header(converted, tmp_path, monkeypatch):
    """Same-size keys (new thresholds over old ones) keep the data offset: the header-only path writes the very
    bytes gguf-py's full rewrite writes; keys that grow the header take the full rewrite."""
    import gguf

    from mc_gguf.gguf_io import edit
    from mc_gguf.gguf_io.edit import float_array, open_gguf, rewrite_metadata

    src = converted("q8_0")
    n_layers = len({t.name.split(".")[1] for t in open_gguf(src).tensors if t.name.startswith("blk.")})
    first = rewrite_metadata(src, tmp_path / "first.gguf", {keys.ODP_MU: float_array([0.1] * n_layers)})
    assert edit._header_bytes(open_gguf(src), {keys.ODP_MU: float_array([0.1] * n_layers)}, ()) is None  # grows
    update = {keys.ODP_MU: float_array([0.3] * n_layers)}
    assert edit._header_bytes(open_gguf(first), update, ()) is not None  # fits
    fast = rewrite_metadata(first, tmp_path / "fast.gguf", update)
    monkeypatch.setattr(edit, "_header_bytes", lambda *a: None)
    full = rewrite_metadata(first, tmp_path / "full.gguf", update)
    assert fast.read_bytes() == full.read_bytes()
    reader = open_gguf(fast)
    assert list(reader.get_field(keys.ODP_MU).contents()) == pytest.approx([0.3] * n_layers)
    for tensor, original in zip(reader.tensors, gguf.GGUFReader(src).tensors):
        assert tensor.name == original.name and (tensor.data == original.data).all()
