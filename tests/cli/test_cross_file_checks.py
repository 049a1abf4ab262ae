"""Files that do not belong together are refused before the slow work, and nothing is changed: a GGUF of another
model in odp-calibrate, a reference with another tokenizer in eval; a plan edited by hand shows the sizes of its
own types."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import pytest
from gguf.scripts.gguf_new_metadata import MetadataDetails

from mc_gguf.cli import main
from mc_gguf.ggml.types import quant_type
from mc_gguf.gguf_io.convert import convert
from mc_gguf.gguf_io.edit import rewrite_metadata
from mc_gguf.gguf_io.header import scan
from mc_gguf.hf.tiny import TinyMixtralSpec, build_tiny_mixtral

from conftest import CALIBRATION_TEXT


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line_error(capsys, argv: list[str], *needles: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mc-gguf: error:")]
    assert code == 1 and len(lines) == 1 and "this is a bug" not in err, err
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def eight_expert_gguf(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("eight")
    model = build_tiny_mixtral(folder / "model", TinyMixtralSpec(seed=5, num_local_experts=8))
    return convert(model, folder / "eight.gguf", "q8_0", progress=False)


def test_odp_calibrate_refuses_a_gguf_of_a_model_with_other_experts(eight_expert_gguf, tiny_model_dir, tmp_path,
                                                                    capsys, monkeypatch):
    """A 4-expert model folder with an 8-expert GGUF: refused before the model pass, in place or not, and the
    GGUF that was given stays as it was (it used to come back with thresholds for 4 experts, no longer
    loading)."""
    import mc_gguf.prune.calibration as calibration

    monkeypatch.setattr(calibration, "router_statistics", lambda *a, **k: pytest.fail("ran the model first"))
    text = tmp_path / "calib.txt"
    text.write_text(CALIBRATION_TEXT)
    before = digest(eight_expert_gguf)
    for out in (tmp_path / "out.gguf", eight_expert_gguf):
        one_line_error(capsys, ["odp-calibrate", str(tiny_model_dir), str(eight_expert_gguf), "--text", str(text),
                                "-o", str(out)], "8 experts", "4", "is it a GGUF of this model?")
    assert digest(eight_expert_gguf) == before
    assert not (tmp_path / "out.gguf").exists()


def test_eval_refuses_a_reference_with_another_tokenizer_before_the_reference_pass(converted, tmp_path, capsys,
                                                                                  monkeypatch):
    import mc_gguf.evaluate.perplexity as perplexity

    monkeypatch.setattr(perplexity, "reference_logits", lambda *a, **k: pytest.fail("ran the reference first"))
    source = converted("q8_0")
    tokens = list(scan(source).fields["tokenizer.ggml.tokens"])
    tokens[1000] = "\u2581zzzzzz"
    other = rewrite_metadata(source, tmp_path / "other-tokenizer.gguf",
                             {"tokenizer.ggml.tokens": MetadataDetails(gguf.GGUFValueType.ARRAY, tokens,
                                                                       sub_type=gguf.GGUFValueType.STRING)})
    text = tmp_path / "text.txt"
    text.write_text(CALIBRATION_TEXT)
    one_line_error(capsys, ["eval", str(source), "--text", str(text), "--ref", str(other), "--ctx", "64"],
                   "different tokenizers", "tokenizer.ggml.tokens")


def test_plan_show_gives_the_sizes_of_the_types_a_plan_holds_after_an_edit(calibration, tiny_model_dir, tmp_path,
                                                                           capsys):
    path = tmp_path / "plan.json"
    assert main(["allocate", str(calibration[0]), "--bits", "3", "-o", str(path), "--model", str(tiny_model_dir)]) == 0
    capsys.readouterr()
    assert main(["plan-show", str(path)]) == 0
    fresh = capsys.readouterr().out
    plan = json.loads(path.read_text())
    stored = plan["predicted"]["expert_bpw"]
    assert f"experts: {stored:.3f} bits per weight" in fresh and "edited" not in fresh
    for layer in plan["experts"]:
        for expert in layer:
            expert.update(gate="Q8_0", up="Q8_0", down="Q8_0")
    path.write_text(json.dumps(plan))
    assert main(["plan-show", str(path)]) == 0
    shown = capsys.readouterr().out
    # every expert Q8_0: 8.5 bits per weight, whatever the stored figure says
    assert f"experts: {quant_type('Q8_0').bits_per_weight:.3f} bits per weight" in shown, shown
    assert "edited after allocate" in shown and f"{stored:.3f}" in shown
