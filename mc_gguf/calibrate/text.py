"""Calibration text: the offline default, and packing a text into token sequences.

The default is the Python documentation every CPython ships in
``pydoc_data.topics`` (about 465,000 characters, PSF licence): English
technical prose with code examples, present on any machine without a
download. It is generic text of the kind llama.cpp's community imatrix files
use; a text from the model's own domain calibrates better (``--text``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mc_gguf.errors import McGgufError

DEFAULT_TEXT_NAME = "pydoc_data.topics (CPython documentation)"


@dataclass(frozen=True)
class CalibrationText:
    name: str    # a file path, or DEFAULT_TEXT_NAME
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def default_text() -> CalibrationText:
    from pydoc_data.topics import topics

    # Each topic is one document; sorted so the text is the same on every run.
    return CalibrationText(DEFAULT_TEXT_NAME, "\n\n".join(topics[key] for key in sorted(topics)))


def read_text(path: str | Path | None) -> CalibrationText:
    """The text of ``path``, or the default when ``path`` is None."""
    if path is None:
        return default_text()
    path = Path(path)
    try:
        return CalibrationText(str(path), path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise McGgufError(f"text file {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise McGgufError(f"text file {path} is not UTF-8 ({exc})") from None


def pack_sequences(token_ids: list[int], bos_id: int | None, n_tokens: int, seq_len: int, seed: int) -> np.ndarray:
    """Cut one token stream into sequences [n_seq, seq_len], each starting with BOS.

    The stream is cut into consecutive, non-overlapping pieces of seq_len - 1
    tokens (seq_len without a BOS); when it holds more pieces than
    ``n_tokens`` needs, a seeded random subset is used, in text order (the
    GPTQ recipe of sampling calibration windows at random).
    """
    if seq_len < 2:
        raise McGgufError(f"a calibration sequence needs at least 2 tokens, got {seq_len}")
    body = seq_len - 1 if bos_id is not None else seq_len
    available = len(token_ids) // body
    wanted = max(1, n_tokens // seq_len)
    if available == 0:
        raise McGgufError(f"the calibration text has {len(token_ids)} tokens, fewer than one sequence of {seq_len}")
    chosen = np.arange(available)
    if available > wanted:
        chosen = np.sort(np.random.default_rng(seed).choice(available, size=wanted, replace=False))
    ids = np.asarray(token_ids, dtype=np.int64)
    pieces = np.stack([ids[i * body:(i + 1) * body] for i in chosen])
    if bos_id is not None:
        pieces = np.concatenate([np.full((len(pieces), 1), bos_id, dtype=np.int64), pieces], axis=1)
    return pieces
