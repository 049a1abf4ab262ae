"""The JSON artifacts of the stages (a plan, the tuned-error ratios): written as every output is, read back
with one set of refusals."""

from __future__ import annotations

import json
from pathlib import Path

from mc_gguf.atomic import atomic_output


def save_json(path: str | Path, format_version: object, fields: dict) -> Path:
    """An artifact as JSON (``{"format": format_version, **fields}``), written as every output is."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps({"format": format_version, **fields}, indent=1) + "\n", encoding="utf-8")
    return Path(path)


def load_json(path: str | Path, format_version: object, what: str, error: type[Exception]) -> dict:
    """The fields of an artifact save_json wrote (``format`` taken out), or ``error`` with one line when the file
    is missing, unreadable, not JSON, or not a ``what`` of ``format_version``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except RecursionError:
        raise error(f"{path} is not a {what} (JSON nested too deeply to read)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path} is not a {what} (not JSON: {exc})") from None
    except OSError as exc:
        raise error(f"{path} is not a readable {what} ({exc.strerror or exc})") from None
    if not isinstance(data, dict) or data.pop("format", None) != format_version:
        raise error(f"{path} is not an mc-gguf {what} of format {format_version!r}")
    return data

