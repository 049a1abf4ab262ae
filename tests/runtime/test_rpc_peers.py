"""No RPC peer can kill or hang a command given --rpc.

ggml-rpc's client aborts its process on a broken connection and waits for a
reply for ever; mc-gguf runs such a command in a child process behind one
relay per server (runtime/supervise.py). A server that dies, closes the
connection, sends what the runtime cannot read or goes silent ends the real
CLI with one "mc-gguf: error:" line naming it and a non-zero exit, in bounded
time; a healthy server through the relay gives the CPU's output. The hostile
peers are Python servers on 127.0.0.1 that answer the HELLO handshake as the
patched rpc-server does.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mc_gguf.runtime.relay import _Link
from mc_gguf.runtime.rpc import ANSWERED_COMMANDS, PROTOCOL_MAJOR, RPC_COMMANDS, RPC_CONN_CAPS_SIZE

from helpers import PROMPT

MC = str(Path(sys.executable).parent / "mc-gguf")
BOUND_S = 120  # every command here ends well within this, or the test fails
HELLO_REPLY = struct.pack("<Q", 4 + RPC_CONN_CAPS_SIZE) + bytes([PROTOCOL_MAJOR, 0, 0, 0]) + bytes(RPC_CONN_CAPS_SIZE)


class Peer:
    """A hostile RPC server on 127.0.0.1. On every connection it answers the handshake as the patched rpc-server
    does (except ``mute``), then: ``close`` closes the connection; ``garbage`` answers the next request with a
    reply of a size no request has; ``unasked`` sends bytes before any request; ``silent`` reads and never
    answers; ``mute`` never answers, not even the handshake."""

    def __init__(self, mode: str):
        self.mode = mode
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.endpoint = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        self.listener.close()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _receive(self, conn: socket.socket, n: int) -> bytes | None:
        data = b""
        while len(data) < n and not self.stopped.is_set():
            try:
                chunk = conn.recv(n - len(data))
            except TimeoutError:
                continue
            except OSError:  # the client reset the connection
                return None
            if not chunk:
                return None
            data += chunk
        return data if len(data) == n else None

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(0.2)
            if self.mode != "mute":
                if self._receive(conn, 1 + 8 + RPC_CONN_CAPS_SIZE) is None:
                    return
                conn.sendall(HELLO_REPLY)
            if self.mode == "close":
                return
            if self.mode == "unasked":
                conn.sendall(b"\x07" * 16)
            if self.mode == "garbage":
                header = self._receive(conn, 9)
                if header is None or self._receive(conn, struct.unpack("<Q", header[1:])[0]) is None:
                    return
                conn.sendall(struct.pack("<Q", 3) + b"bad")
            while self._receive(conn, 1) is not None:  # read, answer nothing
                pass


@pytest.fixture
def peer(request):
    hostile = Peer(request.param)
    yield hostile
    hostile.close()


class Server:
    """`mc-gguf runtime rpc-server` on a free port of 127.0.0.1, its output kept line by line."""

    def __init__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.endpoint = f"127.0.0.1:{port}"
        self.process = subprocess.Popen([MC, "runtime", "rpc-server", "--port", str(port), "--threads", "1"],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        assert self.wait_for(lambda: any(line.startswith("serving") for line in self.lines), 60), self.lines

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_for(self, condition, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.05)
        return False

    def accepted(self) -> int:
        return sum("Accepted client connection" in line for line in self.lines)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


@pytest.fixture
def server():
    started = Server()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def shared_server():
    started = Server()
    yield started
    started.stop()


def mc_gguf(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([MC, *args], capture_output=True, text=True, timeout=BOUND_S, check=False, **kwargs)


def assert_ends_with_one_error(returncode: int, stderr: str, endpoint: str, message: str) -> None:
    """A non-zero exit (not a signal), one error line naming the server and saying ``message``, nothing else of
    an abort or a bug."""
    assert returncode > 0, (returncode, stderr)
    errors = [line for line in stderr.splitlines() if line.startswith("mc-gguf: error:")]
    assert len(errors) == 1, stderr
    assert endpoint in errors[0] and re.search(message, errors[0]), errors[0]
    for word in ("Aborted", "this is a bug", "Traceback", "GGML_ABORT", "core dumped"):
        assert word not in stderr, stderr


@pytest.mark.parametrize(("peer", "message"), [
    ("close", "closed the connection"),
    ("garbage", "sent a reply this runtime cannot read"),
    ("unasked", "sent a reply this runtime cannot read"),
    ("silent", r"stopped answering: no reply in 3 s \(--rpc-timeout\)"),
    ("mute", "did not answer the handshake in 3 s"),
], indirect=["peer"])
def test_a_hostile_peer_ends_run_with_one_error_line(peer, message, converted):
    started = time.monotonic()
    result = mc_gguf("run", str(converted("f16")), "-p", "Hello", "-n", "4", "--rpc", peer.endpoint,
                     "--rpc-timeout", "3")
    assert_ends_with_one_error(result.returncode, result.stderr, peer.endpoint, message)
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("peer", ["silent"], indirect=True)
def test_a_silent_peer_ends_eval_within_the_timeout(peer, converted, tmp_path):
    (tmp_path / "text.txt").write_text(PROMPT * 6, encoding="utf-8")
    result = mc_gguf("eval", str(converted("f16")), "--text", str(tmp_path / "text.txt"), "--ctx", "64",
                     "--rpc", peer.endpoint, "--rpc-timeout", "2")
    assert_ends_with_one_error(result.returncode, result.stderr, peer.endpoint, "stopped answering")


def test_a_server_killed_during_generation_ends_run_with_one_error_line(server, converted):
    run = subprocess.Popen([MC, "run", str(converted("f16")), "-p", "Hello", "-n", "1000", "--rpc", server.endpoint],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the parent's handshake, the child's, then llama.cpp's own connection, which loads the model
        assert server.wait_for(lambda: server.accepted() >= 3, 60), server.lines
        time.sleep(0.5)
        assert run.poll() is None, "the run ended before the server was killed"
        server.stop()
        _, stderr = run.communicate(timeout=BOUND_S)
    finally:
        run.kill()
    assert_ends_with_one_error(run.returncode, stderr, server.endpoint,
                               "closed the connection during the run|failed during the run")


def test_a_server_killed_while_chat_waits_for_input_ends_it(server, converted):
    chat = subprocess.Popen([MC, "chat", str(converted("f16")), "--rpc", server.endpoint],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "an empty line or Ctrl-D ends the chat" in _stderr_line(chat, 60)
        server.stop()  # stdin stays open: the chat would wait for ever, but the server is gone
        _, stderr = chat.communicate(timeout=BOUND_S)
    finally:
        chat.kill()
    assert_ends_with_one_error(chat.returncode, stderr, server.endpoint,
                               "closed the connection during the run|failed during the run")


def test_ctrl_c_ends_a_command_given_rpc_as_the_cli_does(shared_server, converted):
    chat = subprocess.Popen([MC, "chat", str(converted("f16")), "--rpc", shared_server.endpoint],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert "an empty line or Ctrl-D ends the chat" in _stderr_line(chat, 60)
        os.killpg(chat.pid, signal.SIGINT)  # as the terminal does: the whole process group
        chat.wait(timeout=BOUND_S)  # stdin stays open: its end would be a second way out of the chat
        _, stderr = chat.communicate(timeout=BOUND_S)
    finally:
        chat.kill()
    assert chat.returncode == 130, stderr
    assert stderr.count("mc-gguf: interrupted") == 1 and "mc-gguf: error:" not in stderr, stderr


def test_a_chat_idle_longer_than_the_timeout_goes_on(shared_server, converted):
    """The timeout counts only while the server owes a reply: a chat waiting for its user is no stall, whatever
    request (answered or not) it sent last."""
    chat = subprocess.Popen([MC, "chat", str(converted("f16")), "-n", "8", "--rpc", shared_server.endpoint,
                             "--rpc-timeout", "1"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "an empty line or Ctrl-D ends the chat" in _stderr_line(chat, 60)
        chat.stdin.write("Hello\n")
        chat.stdin.flush()
        time.sleep(4)  # the reply, then three seconds and more of waiting for the user
        assert chat.poll() is None
        _, stderr = chat.communicate("How are you?\n\n", timeout=BOUND_S)
    finally:
        chat.kill()
    assert chat.returncode == 0 and "mc-gguf: error:" not in stderr, stderr


def test_run_through_the_relay_gives_the_cpus_text(shared_server, converted):
    args = ["run", str(converted("f16")), "-p", PROMPT, "-n", "24"]
    cpu = mc_gguf(*args)
    accepted = shared_server.accepted()
    remote = mc_gguf(*args, "--rpc", shared_server.endpoint, "--rpc-timeout", "5")
    assert cpu.returncode == 0 and remote.returncode == 0, (cpu.stderr, remote.stderr)
    assert shared_server.accepted() > accepted
    assert remote.stdout == cpu.stdout


def test_eval_through_the_relay_gives_the_cpus_perplexity_and_never_times_out(shared_server, converted, tmp_path):
    (tmp_path / "text.txt").write_text(PROMPT * 6, encoding="utf-8")
    args = ["eval", str(converted("f16")), "--text", str(tmp_path / "text.txt"), "--ctx", "64", "--json"]
    cpu = mc_gguf(*args)
    accepted = shared_server.accepted()
    remote = mc_gguf(*args, "--rpc", shared_server.endpoint, "--rpc-timeout", "5")
    assert cpu.returncode == 0 and remote.returncode == 0, (cpu.stderr, remote.stderr)
    assert shared_server.accepted() > accepted
    cpu_report, remote_report = json.loads(cpu.stdout), json.loads(remote.stdout)
    assert remote_report["tokens_scored"] == cpu_report["tokens_scored"] > 0
    assert remote_report["ppl"] == pytest.approx(cpu_report["ppl"], rel=1e-6)
    assert remote_report["settings"]["rpc"] == [shared_server.endpoint]


def test_the_relay_knows_which_commands_ggml_rpc_answers():
    """RPC_COMMANDS is ggml-rpc.cpp's enum rpc_cmd, and a command is answered where rpc_serve_client sends a reply
    (send_msg) in its case; HELLO is answered before that loop."""
    from mc_gguf.runtime.source import patched_source

    source = (patched_source() / "ggml" / "src" / "ggml-rpc" / "ggml-rpc.cpp").read_text()
    enum = re.search(r"enum rpc_cmd \{(.*?)\};", source, re.S).group(1)
    names = re.findall(r"RPC_CMD_(\w+)", enum)
    assert names[:len(RPC_COMMANDS)] == [name for name, _ in RPC_COMMANDS]
    assert names[len(RPC_COMMANDS):] == ["NONE", "COUNT"]
    serve = source[source.index("static void rpc_serve_client"):source.index("void ggml_backend_rpc_start_server")]
    cases = re.split(r"case RPC_CMD_(\w+):", serve[serve.index("switch (cmd)"):])
    answered = {name for name, body in zip(cases[1::2], cases[2::2]) if "send_msg" in body} | {"HELLO"}
    assert {RPC_COMMANDS[code][0] for code in ANSWERED_COMMANDS} == answered


def test_the_relay_follows_requests_and_replies_across_chunks():
    link = _Link(None, None)
    code = {name: n for n, (name, _) in enumerate(RPC_COMMANDS)}
    set_tensor = bytes([code["SET_TENSOR"]]) + struct.pack("<Q", 5) + b"12345"   # not answered
    get_tensor = bytes([code["GET_TENSOR"]]) + struct.pack("<Q", 2) + b"ab"      # answered
    stream = set_tensor + get_tensor + get_tensor
    for i in range(len(stream)):  # one byte at a time: headers split anywhere
        link.requests(memoryview(stream)[i:i + 1])
    assert link.owed == 2
    reply = struct.pack("<Q", 3) + b"xyz"
    assert link.replies(memoryview(reply[:4])) and link.owed == 2
    assert link.replies(memoryview(reply[4:] + struct.pack("<Q", 0))) and link.owed == 0  # an empty reply ends
    assert not link.replies(memoryview(b"?"))  # nothing owed: bytes no request asked for


def _stderr_line(process: subprocess.Popen, seconds: float) -> str:
    """The process's stderr up to the line that says it waits for input, read within ``seconds``."""
    lines: list[str] = []

    def read() -> None:
        for line in process.stderr:
            lines.append(line)
            if "ends the chat" in line:
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(seconds)
    return "".join(lines)


def test_serve_through_the_relay_gives_the_cpus_text_and_ends_when_its_server_dies(converted, tmp_path):
    """serve --rpc: the supervised child answers OpenAI's API with the CPU's greedy text; when the rpc-server dies,
    the server ends with one error line (no abort, no hang), and so does the request in flight."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from mc_gguf.evaluate.run import generate

    model = converted("f16")
    rpc = Server()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = tmp_path / "serve.err"
    with open(err, "w") as stderr:
        serve = subprocess.Popen([MC, "serve", str(model), "--port", str(port), "--rpc", rpc.endpoint,
                                  "--rpc-timeout", "5"], stdout=subprocess.DEVNULL, stderr=stderr)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
    try:
        deadline = time.monotonic() + BOUND_S
        while True:
            assert serve.poll() is None and time.monotonic() < deadline, err.read_text()
            try:
                reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                                  extra_body={"repeat_penalty": 1.0})
                break
            except openai.APIConnectionError:
                time.sleep(0.2)
        assert rpc.accepted() > 0
        assert reply.choices[0].text == generate(model, PROMPT, 12)[0]
        rpc.stop()
        with pytest.raises(openai.APIError):
            client.completions.create(model="tiny", prompt=PROMPT + " again", max_tokens=12, temperature=0)
        serve.wait(BOUND_S)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait(10)
        rpc.stop()
    assert_ends_with_one_error(serve.returncode, err.read_text(), rpc.endpoint, "")


def test_bench_through_the_relay_places_the_model_on_the_server(shared_server, converted):
    result = mc_gguf("bench", str(converted("f16")), "-p", "16", "-n", "4", "-r", "1", "-o", "json",
                     "--rpc", shared_server.endpoint, "--rpc-timeout", "5")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["test"] for r in rows] == ["pp16", "tg4"]
    assert "RPC" in rows[0]["backends"].split(",") and rows[0]["n_gpu_layers"] == -1
