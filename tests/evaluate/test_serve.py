"""`mc-gguf serve`: OpenAI's API over HTTP on the patched runtime, pruning as run prunes, the skipped slots at /metrics.

Each server is a real process on a free port of 127.0.0.1, spoken to with the `openai` client package; every wait
is bounded and every server is stopped in a finally.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from mc_gguf.evaluate.run import generate  # noqa: E402
from mc_gguf.evaluate.serve import load_for_serving  # noqa: E402
from mc_gguf.evaluate.serve_app import ServeError, create_app, require_server_packages  # noqa: E402
from mc_gguf.evaluate.slot_metrics import metrics_text  # noqa: E402
from mc_gguf.gguf_io.edit import MetadataDetails, rewrite_metadata  # noqa: E402
from mc_gguf.prune.rule import SlotCounts  # noqa: E402

MU = 0.9  # skips about a third of the tiny model's slots (tests/evaluate/test_evaluate.py uses it too)
PROMPT = "The quick brown fox"
MAX_TOKENS = 12
START_TIMEOUT_S = 120
REQUEST_TIMEOUT_S = 60
PAST_THE_CONTEXT = "word " * 1100  # the tiny model's context: 1024 tokens


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def mc_gguf(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mc_gguf.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


class Server:
    """`mc-gguf serve MODEL --port PORT ARGS...`, its output kept in files."""

    def __init__(self, model: Path, log_dir: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.out, self.err = log_dir / f"serve-{self.port}.out", log_dir / f"serve-{self.port}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.process = subprocess.Popen([sys.executable, "-m", "mc_gguf.cli", "serve", str(model),
                                             "--port", str(self.port), *args], stdout=out, stderr=err)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0,
                                    timeout=REQUEST_TIMEOUT_S)
        self.first_text = ""  # the greedy completion of PROMPT it served first (started())

    def log(self) -> str:
        return f"stdout:\n{self.out.read_text()}\nstderr:\n{self.err.read_text()}"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the server exited with {self.process.returncode}\n{self.log()}"
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        pytest.fail(f"the server did not answer in {START_TIMEOUT_S} s\n{self.log()}")

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.url + "/metrics", timeout=REQUEST_TIMEOUT_S) as response:
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = response.read().decode()
        return {name: float(value) for name, value in re.findall(r"^(mc_gguf_\w+) (\S+)$", text, re.M)}

    def complete(self, prompt: str = PROMPT, max_tokens: int = MAX_TOKENS, **kwargs):
        return self.client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                              extra_body={"repeat_penalty": 1.0}, **kwargs)

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        """Signal the server, wait (bounded) for it to end; its exit status and stderr."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        return self.process.returncode, self.err.read_text()


def started(model: Path, log_dir: Path, *args: str) -> Server:
    """A server that answers, having served one greedy completion of PROMPT as its very first request (a later one
    reuses the cached prefix, at least the BOS token, and computes the rest in another batch)."""
    server = Server(model, log_dir, *args)
    try:
        server.wait_ready()
        server.first_text = server.complete().choices[0].text
    except BaseException:
        server.stop(signal.SIGKILL)
        raise
    return server


@pytest.fixture(scope="module")
def model(converted) -> Path:
    return converted("q8_0")


@pytest.fixture(scope="module")
def pruned(model, tmp_path_factory):
    server = started(model, tmp_path_factory.mktemp("serve-pruned"), "--mu", str(MU))
    try:
        yield server
    finally:
        server.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def unpruned(model, tmp_path_factory):
    server = started(model, tmp_path_factory.mktemp("serve-unpruned"), "--mu", str(MU), "--no-odp")
    try:
        yield server
    finally:
        server.stop(signal.SIGKILL)


# ------------------------------------------------------------ answers


def test_a_completion_is_the_text_mc_gguf_run_generates(pruned, unpruned, model):
    text, counts = generate(model, PROMPT, MAX_TOKENS, mu=MU)
    assert sum(counts.skipped) > 0
    assert pruned.first_text == text
    assert unpruned.first_text == generate(model, PROMPT, MAX_TOKENS, odp=False)[0]


def test_a_chat_completion_answers_with_a_message(pruned):
    reply = pruned.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                                  max_tokens=8, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length") and 0 < reply.usage.completion_tokens <= 8


def test_a_streamed_chat_completion_arrives_piece_by_piece(pruned):
    stream = pruned.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                                   max_tokens=8, temperature=0, stream=True)
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_two_concurrent_requests_are_both_answered_in_full(pruned):
    stream = pruned.complete(max_tokens=16, stream=True)
    try:
        chunks = [next(iter(stream))]  # the stream is in flight
        with ThreadPoolExecutor(1) as pool:
            plain = pool.submit(pruned.complete, max_tokens=16)
            time.sleep(0.2)
            chunks += list(stream)
            reply = plain.result(timeout=2 * REQUEST_TIMEOUT_S)
    finally:
        stream.close()
    # the second request waits for the stream instead of cutting it short (llama_cpp.server's interrupt_requests)
    assert "".join(c.choices[0].text for c in chunks) and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert reply.choices[0].text and reply.choices[0].finish_reason in ("stop", "length")
    assert 0 < reply.usage.completion_tokens <= 16


@pytest.mark.parametrize("kind", ["completion", "streamed completion", "chat", "streamed chat"])
def test_a_request_past_the_context_is_refused_and_the_server_goes_on(unpruned, kind):
    stream = kind.startswith("streamed")
    with pytest.raises(openai.BadRequestError) as refused:
        if "chat" in kind:
            message = {"role": "user", "content": PAST_THE_CONTEXT}
            unpruned.client.chat.completions.create(model="tiny", messages=[message], max_tokens=4, stream=stream)
        else:
            unpruned.complete(PAST_THE_CONTEXT, 4, stream=stream)
    assert refused.value.status_code == 400 and "maximum context length is 1024 tokens" in refused.value.message
    assert unpruned.complete(max_tokens=2).choices[0].text
    assert "Traceback" not in unpruned.err.read_text(), unpruned.log()


def test_a_chat_template_jinja_cannot_compile_refuses_chat_and_serves_completions(model, tmp_path, capsys):
    from fastapi import HTTPException

    template = MetadataDetails(gguf.GGUFValueType.STRING, "{% if messages %}{{ x }")
    llm = load_for_serving(rewrite_metadata(model, tmp_path / "unparsable.gguf", {"tokenizer.chat_template": template}))
    try:
        create_app(llm)
        assert "mc-gguf serve: chat requests will be refused" in capsys.readouterr().err
        with pytest.raises(HTTPException) as refused:
            llm.create_chat_completion(messages=[{"role": "user", "content": "Hello"}], max_tokens=2)
        assert refused.value.status_code == 400 and "chat template cannot be used" in refused.value.detail
        assert llm.create_completion(PROMPT, max_tokens=2)["usage"]["completion_tokens"] == 2
    finally:
        llm.close()


# ------------------------------------------------------------ /metrics


def test_metrics_count_the_slots_of_each_request_and_the_share_skipped(pruned):
    before = pruned.metrics()
    pruned.complete(max_tokens=4)
    after = pruned.metrics()
    slots = ("mc_gguf_expert_slots_computed_total", "mc_gguf_expert_slots_skipped_total")
    assert all(after[name] > before[name] for name in slots)
    computed, skipped = (after[name] for name in slots)
    assert after["mc_gguf_expert_slots_skipped_ratio"] == pytest.approx(skipped / (computed + skipped))
    assert 0 < after["mc_gguf_expert_slots_skipped_ratio"] < 0.5  # top-2: the first slot always runs


def test_metrics_show_nothing_skipped_without_pruning(unpruned):
    unpruned.complete(max_tokens=4)
    metrics = unpruned.metrics()
    assert metrics["mc_gguf_expert_slots_computed_total"] > 0
    assert metrics["mc_gguf_expert_slots_skipped_total"] == 0 and metrics["mc_gguf_expert_slots_skipped_ratio"] == 0


def test_metrics_text_is_prometheus_exposition_format():
    text = metrics_text(SlotCounts([3, 5], [1, 1]))
    samples = [line for line in text.splitlines() if not line.startswith("#")]
    assert samples == ["mc_gguf_expert_slots_computed_total 8", "mc_gguf_expert_slots_skipped_total 2",
                       "mc_gguf_expert_slots_skipped_ratio 0.2"]
    for name in ("computed_total", "skipped_total", "skipped_ratio"):
        assert f"# TYPE mc_gguf_expert_slots_{name} " in text and f"# HELP mc_gguf_expert_slots_{name} " in text
    assert metrics_text(SlotCounts([0, 0], [0, 0])).endswith("mc_gguf_expert_slots_skipped_ratio 0.0\n")


# ------------------------------------------------------------ starting and stopping


def test_sigterm_stops_a_server_mid_reply_without_a_traceback(model, tmp_path):
    server = started(model, tmp_path, "--no-odp")
    try:
        stream = server.complete(max_tokens=1000, stream=True)
        try:
            next(iter(stream))
            code, err = server.stop(signal.SIGTERM)
        finally:
            stream.close()
    finally:
        server.stop(signal.SIGKILL)
    assert code in (0, 130) and "Traceback" not in err and "this is a bug" not in err, err


def one_error_line(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert "Traceback" not in result.stderr and "this is a bug" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("mc-gguf: error:")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr
    assert all(needle in errors[0] for needle in needles), result.stderr
    return errors[0]


def test_a_busy_port_is_refused_in_one_line(model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = mc_gguf("serve", str(model), "--port", str(port))
    one_error_line(result, f"127.0.0.1:{port}", "in use")


def test_a_bad_model_path_is_refused_in_one_line(tmp_path):
    missing = tmp_path / "missing.gguf"
    one_error_line(mc_gguf("serve", str(missing), "--port", str(free_port())), str(missing))
    not_gguf = tmp_path / "text.gguf"
    not_gguf.write_text("not a model")
    one_error_line(mc_gguf("serve", str(not_gguf), "--port", str(free_port())), str(not_gguf))


@pytest.mark.parametrize("port", ["0", "65536", "http"])
def test_a_port_out_of_range_is_refused_by_the_parser(model, port):
    result = mc_gguf("serve", str(model), "--port", port)
    assert result.returncode == 2 and "--port" in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_serve_help_imports_neither_the_server_nor_the_runtime():
    code = ("import sys\nfrom mc_gguf.cli import main\ntry:\n    main(['serve', '--help'])\nexcept SystemExit:\n"
            "    pass\nprint(sorted({m.split('.')[0] for m in sys.modules}))")
    modules = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "COLUMNS": "120"}).stdout.splitlines()[-1]
    for heavy in ("fastapi", "uvicorn", "llama_cpp", "torch", "numpy"):
        assert f"'{heavy}'" not in modules


def test_missing_server_packages_are_named_with_the_extra_to_install(monkeypatch):
    import mc_gguf.evaluate.serve_app as serve_app

    monkeypatch.setitem(serve_app.SERVER_PACKAGES, "mc_gguf_no_such_module", "no-such-package")
    with pytest.raises(ServeError, match=r"no-such-package.*mc-gguf\[serve\]"):
        require_server_packages()
