"""The Python API has the command line's defaults (one settings object gives both), and README's example runs as
it stands."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from mc_gguf.cli import build_parser
from mc_gguf.cli.compress import settings_of
from mc_gguf.settings import CompressSettings

ROOT = Path(__file__).resolve().parents[1]


def test_compress_flags_left_alone_give_the_python_apis_settings(tmp_path):
    args = build_parser().parse_args(["compress", "model", "--bits", "2.5", "-o", str(tmp_path / "o.gguf")])
    assert settings_of(args) == CompressSettings(bits=2.5)
    assert CompressSettings().resolved().allocation.per_projection is True  # tuned: a type per projection
    args = build_parser().parse_args(["compress", "model", "--bits", "3", "--no-tune", "-o", "o.gguf"])
    assert settings_of(args).tune is None and settings_of(args).resolved().allocation.per_projection is False


def test_importing_the_package_loads_neither_torch_nor_llama_cpp():
    code = ("import sys, mc_gguf; mc_gguf.CompressSettings; "
            "print(any(m in sys.modules for m in ('torch', 'llama_cpp', 'numpy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_readme_example_runs_as_it_stands(tiny_model_dir, tmp_path):
    """README's first Python block, with mistralai/Mixtral-8x7B-v0.1 resolved offline to the tiny model laid out in
    a Hub cache: compress's defaults (tuned) write a per-expert file the runtime runs. The one change: the
    calibration reads 2048 tokens instead of 65536 and measures three candidate types instead of twelve (the
    tuned-error pass tunes a sample for each: minutes less); every other setting is the default."""
    from hf.test_hub import lay_out_cache

    readme = (ROOT / "README.md").read_text()
    example = re.findall(r"```python\n(.*?)```", readme, flags=re.S)[0]
    call = 'mc_gguf.compress("mistralai/Mixtral-8x7B-v0.1", "mixtral-mc2.5.gguf", bits=2.5)'
    assert call in example and "mc_gguf.load(" in example
    shorter = ('mc_gguf.compress("mistralai/Mixtral-8x7B-v0.1", "mixtral-mc2.5.gguf", bits=2.5, settings='
               'mc_gguf.CompressSettings(calibration=mc_gguf.CalibrationSettings(n_tokens=2048, seq_len=256, '
               'types=("IQ2_XS", "Q2_K", "Q4_K"))))')
    example = example.replace(call, shorter)
    hf_home = tmp_path / "hf"
    lay_out_cache(hf_home, "mistralai/Mixtral-8x7B-v0.1", tiny_model_dir)
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), "the completion printed nothing"
    from mc_gguf.gguf_io.header import scan

    header = scan(tmp_path / "mixtral-mc2.5.gguf")
    from mc_gguf.quantize.settings import TuneSettings

    assert header.fields["mc.quantize.tune_iters"] == TuneSettings().iters  # tuned, as `mc-gguf compress`
    assert header.fields["general.name"] == "Mixtral 8x7B v0.1"  # named after the repository
