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



SAMPLES = {"UINT32": 7, "INT32": -3, "FLOAT32": 0.25, "BOOL": True, "STRING": "Q4_K"}


def test_every_key_is_written_and_read_back_with_its_type_by_gguf_py(tmp_path):
    """keys.write through gguf-py's writer, keys.read through its reader: each key's value and GGUF type."""
    import gguf

    path = tmp_path / "keys.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    values = {key.name: [SAMPLES[key.value_type]] * 3 if key.length else SAMPLES[key.value_type] for key in keys.KEYS}
    for name, value in values.items():
        keys.write(writer, name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    reader = gguf.GGUFReader(path)
    for key in keys.KEYS:
        field = reader.get_field(key.name)
        expected = ["ARRAY", key.value_type] if key.length else [key.value_type]
        assert [t.name for t in field.types] == expected, key.name
        assert keys.read(reader, key.name) == values[key.name], key.name
    assert keys.read(reader, "mc.odp.mu") == [0.25] * 3


def test_reading_a_key_stored_with_another_type_names_both(tmp_path):
    import gguf

    from mc_gguf.errors import GGUFFileError

    path = tmp_path / "wrong.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_float32(keys.ODP_MU, 0.5)  # a single value where an array belongs
    writer.add_array(keys.EXPERT_GROUPS, [0.5, 1.5])  # float items where int32 belong
    writer.add_uint32(keys.ODP_ENABLED, 1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    reader = gguf.GGUFReader(path)
    for name, message in ((keys.ODP_MU, "must be an array of float32, the file stores float32"),
                          (keys.EXPERT_GROUPS, "must be an array of int32, the file stores array of float32"),
                          (keys.ODP_ENABLED, "must be a bool, the file stores uint32")):
        with pytest.raises(GGUFFileError, match=re.escape(f"{name} {message}")):
            keys.read(reader, name)
    assert keys.read(reader, keys.ODP_PROTECT_RATIO) is None


def test_format_md_states_each_keys_type():
    doc = (ROOT / "docs" / "FORMAT.md").read_text()
    for key in keys.KEYS:
        row = next((line for line in doc.splitlines() if f"`{key.name}`" in line and "|" in line), "")
        assert key.gguf_type in row, (key.name, key.gguf_type, row)
