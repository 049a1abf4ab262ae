"""gguf_io/keys.py is the one definition of every mc.* key: the code writes no other, FORMAT.md documents each."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mc_gguf.gguf_io import keys

ROOT = Path(__file__).resolve().parents[2]


def test_every_key_is_documented_in_format_md_with_its_type():
    doc = (ROOT / "docs" / "FORMAT.md").read_text()
    for key in keys.KEYS:
        assert f"`{key.name}`" in doc, f"{key.name} is not in docs/FORMAT.md"


def test_no_module_spells_an_mc_key_but_keys_py():
    """Every mc.* string the package uses comes from keys.py (messages may name a key in prose)."""
    literal = re.compile(r"""["'](mc\.[a-z_.]+)["']""")
    for path in (ROOT / "mc_gguf").rglob("*.py"):
        if path.name == "keys.py":
            continue
        found = literal.findall(path.read_text())
        assert not found, f"{path.relative_to(ROOT)} spells {found}: use mc_gguf.gguf_io.keys"


def test_key_names_are_unique_and_meanings_one_line():
    names = [key.name for key in keys.KEYS]
    assert len(names) == len(set(names))
    for key in keys.KEYS:
        assert key.name.startswith("mc.") and key.meaning and "\n" not in key.meaning
        assert key.read_by in ("runtime", "info")


@pytest.fixture(scope="module")
def compressed(tiny_model_dir, calibration, tmp_path_factory):
    from mc_gguf.allocate.allocation import allocate
    from mc_gguf.prune.rule import OdpParams
    from mc_gguf.quantize.quantization import quantize

    stats_path, stats = calibration
    plan = allocate(stats, 3.0, model_dir=tiny_model_dir)
    out = tmp_path_factory.mktemp("keys") / "mixed.gguf"
    return quantize(tiny_model_dir, plan, out, stats=stats, gptq=False, odp=OdpParams([0.2, 0.3]), progress=False)


def test_a_compressed_file_holds_only_known_keys_and_inspect_explains_each(compressed):
    import gguf

    from mc_gguf.gguf_io.inspect import describe, inspect_gguf

    written = {name for name in gguf.GGUFReader(compressed).fields if name.startswith("mc.")}
    assert written <= set(keys.BY_NAME), written - set(keys.BY_NAME)
    assert {keys.EXPERT_GROUPS, keys.PLAN_TYPES, keys.ODP_MU, keys.VERSION} <= written
    text = describe(inspect_gguf(compressed))
    for name in written - {k.name for k in keys.KEYS if k.bulky}:
        assert f"  {name} = " in text and keys.BY_NAME[name].meaning in text

