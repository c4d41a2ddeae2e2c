"""The `moestream` CLI through real child processes: run (text and --json), chat with scripted stdin, errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from moestream.engine.cli import build_parser, main

from runtime_model import build_runtime_model, subprocess_env

CLI = [sys.executable, "-m", "moestream.engine.cli"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_runtime_model(tmp_path_factory.mktemp("cli_model"))


def _run(args: list[str], stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, input=stdin, capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env())


def test_run_json(model_dir: Path) -> None:
    proc = _run(["run", str(model_dir), "-p", "The quick brown fox", "-n", "12", "--json", "--memory", "2GiB"])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["tokens"]) == 12 and out["finish_reason"] == "length" and isinstance(out["text"], str)
    st = out["stats"]
    assert st["generated_tokens"] == 12 and st["prompt_tokens"] > 0
    assert st["prefill_tok_s"] > 0 and st["decode_tok_s"] > 0 and st["peak_rss_bytes"] > 0
    assert out["engine"]["memory_budget_bytes"] == 2 * 2**30 and out["model"] == model_dir.name


def test_run_text_and_stats_line(model_dir: Path) -> None:
    args = ["run", str(model_dir), "-p", "Hello", "-n", "8", "--seed", "1", "--temperature", "0.7"]
    proc = subprocess.run(CLI + args, capture_output=True, timeout=300, env=subprocess_env())  # bytes: keep \r
    assert proc.returncode == 0, proc.stderr
    js = _run(args + ["--json"])
    assert proc.stdout.decode("utf-8") == json.loads(js.stdout)["text"] + "\n"
    stats_lines = [line for line in proc.stderr.decode().splitlines() if "tok/s" in line]
    assert len(stats_lines) == 1 and "peak RSS" in stats_lines[0] and "prompt" in stats_lines[0]
    quiet = _run(["--quiet", "run", str(model_dir), "-p", "Hello", "-n", "2"])
    assert quiet.returncode == 0 and "tok/s" not in quiet.stderr
    piped = _run(["run", str(model_dir), "-n", "2", "--json", "--quiet"], stdin="prompt from stdin")
    assert json.loads(piped.stdout)["prompt"] == "prompt from stdin"


def test_missing_model_is_one_line_error(tmp_path: Path) -> None:
    proc = _run(["run", str(tmp_path / "missing"), "-p", "hi"])
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "does not exist" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    debug = _run(["run", str(tmp_path / "missing"), "-p", "hi", "--debug"])
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_bad_options_are_clear(model_dir: Path) -> None:
    proc = _run(["run", str(model_dir), "-p", "hi", "--top-p", "3"])
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "top_p" in proc.stderr  # before loading
    proc = _run(["run", str(model_dir), "-p", "hi", "--memory", "plenty"])
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr


def test_help_lists_verbs(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for verb in ("run", "chat", "serve"):
        assert verb in text
    sub = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for verb in ("run", "chat", "serve"):
        assert sub[verb].description
    assert main([]) == 2


def test_chat_scripted_session(model_dir: Path) -> None:
    script = "Hello there\n/stats\nAnd again\n/reset\n/bogus\n/exit\nnever read\n"
    proc = _run(["chat", str(model_dir), "-n", "6", "--seed", "3", "--ctx", "256"], stdin=script)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.count(">>> ") == 6  # one prompt per line read, nothing after /exit
    start = out.index("{")
    stats = json.JSONDecoder().raw_decode(out[start:])[0]
    assert stats["last_answer"]["generated_tokens"] == 6 and stats["history_messages"] == 2
    assert "(conversation cleared)" in out and "unknown command /bogus" in out


def test_chat_history_and_eof(model_dir: Path) -> None:
    # two turns then EOF: the second prompt is templated with the first turn's history
    proc = _run(["chat", str(model_dir), "-n", "4", "--temperature", "0", "--system", "Be brief."],
                stdin="One\nTwo\n/stats\n")
    assert proc.returncode == 0, proc.stderr
    stats = json.JSONDecoder().raw_decode(proc.stdout[proc.stdout.index("{"):])[0]
    assert stats["history_messages"] == 5  # system + 2 x (user, assistant)
    assert stats["last_answer"]["prompt_tokens"] > 20


def test_chat_ctrl_c_stops_answer_not_session(model_dir: Path) -> None:
    proc = subprocess.Popen(CLI + ["chat", str(model_dir), "-n", "100000", "--ctx", "3000", "--seed", "0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=subprocess_env())
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.extend(iter(lambda: proc.stdout.read(1), b"")), daemon=True)
    reader.start()
    try:
        proc.stdin.write(b"Tell me a long story\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 600  # hang guard only (the CPU may be shared), not a speed check
        while len(b"".join(out).split(b">>> ", 1)[-1]) < 20:  # the answer is streaming
            assert time.monotonic() < deadline and proc.poll() is None, b"".join(out)
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        while b"[stopped]" not in b"".join(out):
            assert time.monotonic() < deadline and proc.poll() is None, b"".join(out)
            time.sleep(0.05)
        proc.stdin.write(b"/stats\n/exit\n")
        proc.stdin.flush()
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    text = b"".join(out).decode("utf-8", "replace")
    stats = json.JSONDecoder().raw_decode(text[text.index("{"):])[0]
    assert stats["last_answer"]["finish_reason"] == "cancelled" and stats["history_messages"] == 2


def test_cli_without_the_server_stack_runs_and_serve_says_what_to_install():
    """A machine without fastapi (e.g. a GPU image) still runs every other verb; ``serve`` names what is missing."""
    code = ("import sys; sys.modules['fastapi'] = None; from moestream.engine.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    env = subprocess_env()
    helped = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert helped.returncode == 0 and "serve" in helped.stdout
    served = subprocess.run([sys.executable, "-c", code, "serve", "default"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert served.returncode == 2
    assert "pip install fastapi uvicorn" in served.stderr and "Traceback" not in served.stderr
