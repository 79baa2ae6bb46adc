"""The command line with bad input or a Ctrl-C: one line on stderr and a nonzero exit, never a Python
traceback. Each case runs `python -m xpu_coopt.cli` in a subprocess, as a user would."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import pytest
from helpers import STORIES_MODEL, STORIES_TOKENIZER, require_data

from xpu_coopt.checkpoints import smollm2_location
from xpu_coopt.cli import main

COMMAND = [sys.executable, "-m", "xpu_coopt.cli"]
STORIES_ARGS = ["--model", str(STORIES_MODEL), "--tokenizer", str(STORIES_TOKENIZER), "--dtype", "float32"]


def _run(args: list[str | bytes], stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([*COMMAND, *args], input=stdin, capture_output=True, timeout=300)


def _assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    err = result.stderr.decode(errors="replace")
    assert result.returncode == 2, err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("xpu-coopt ")]
    assert message in line, err


def _bad_checkpoints(folder):
    """A GGUF cut to 100 bytes, one with a GGUF magic and garbage after, and a llama2.c file of garbage."""
    gguf = smollm2_location()[0] / smollm2_location()[1]
    cut = folder / "cut.gguf"
    cut.write_bytes(gguf.read_bytes()[:100])
    header = folder / "header.gguf"
    header.write_bytes(b"GGUF\x03\x00\x00\x00" + b"garbage" * 3)
    garbage = folder / "garbage.bin"
    garbage.write_bytes(bytes(range(256)) * 12)
    return {
        "cut gguf": ([str(cut)], "cut.gguf is not a readable GGUF file: cut short or damaged"),
        "gguf garbage": ([str(header)], "header.gguf is not a readable GGUF file: cut short or damaged"),
        "llama2.c garbage": ([str(garbage), "--tokenizer", str(STORIES_TOKENIZER)], "garbage.bin is not a llama2.c checkpoint"),
    }  # fmt: skip


def test_unreadable_checkpoints_are_one_line_errors(tmp_path):
    for model, message in _bad_checkpoints(tmp_path).values():
        _assert_one_line_error(_run(["generate", "--model", *model, "--prompt", "hi"]), message)


def test_bytes_that_are_not_utf8_in_a_prompt_are_replaced():
    require_data(STORIES_MODEL)
    result = _run(["generate", *STORIES_ARGS, "--prompt", b"Once \xff\xfe upon", "--max-new-tokens", "4"])
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout.decode().startswith("Once \ufffd\ufffd upon")


def test_a_prompt_file_that_is_not_utf8_is_named(tmp_path, capsys):
    require_data(STORIES_MODEL)
    prompt = tmp_path / "latin1.txt"
    prompt.write_bytes(b"caf\xe9")
    assert main(["generate", *STORIES_ARGS, "--prompt-file", str(prompt)]) == 2
    assert f"{prompt} is not UTF-8 text" in capsys.readouterr().err


def test_an_unexpected_error_is_one_line_naming_its_type(monkeypatch, capsys):
    import xpu_coopt.checkpoints

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(xpu_coopt.checkpoints, "load_model", broken)
    assert main(["generate", "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert "error: ZeroDivisionError: a bug (set XPU_COOPT_TRACEBACK=1" in err and "Traceback" not in err
    monkeypatch.setenv("XPU_COOPT_TRACEBACK", "1")
    with pytest.raises(ZeroDivisionError):
        main(["generate", "--prompt", "hi"])


def _read_until(stream, wanted: bytes, timeout: float) -> bytes:
    """What the stream gives until `wanted` appears in it (or the time is up)."""
    seen, deadline = b"", time.monotonic() + timeout
    while wanted not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], 1.0)
        if ready:
            block = os.read(stream.fileno(), 4096)
            if not block:
                break
            seen += block
    return seen


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on():
    """--interactive: Ctrl-C during a reply stops that reply, leaves its turn out and reads the next turn
    (here with bytes that are not UTF-8); the end of stdin ends the chat, exit status 0."""
    process = subprocess.Popen(
        [*COMMAND, "generate", "--interactive", "--max-new-tokens", "400"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        process.stdin.write(b"Write a long story about a dragon who learns to paint.\n")
        process.stdin.flush()
        streamed = _read_until(process.stdout, b" ", timeout=240)  # the reply has begun
        assert streamed, process.stderr.read().decode(errors="replace")
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(b"Say hello to \xff\xfe Anna.\n", timeout=240)
        assert out.count(b"\n") >= 2  # the stopped reply's line, then the whole second reply
    finally:
        process.kill()
    err = err.decode(errors="replace")
    assert process.returncode == 0, err
    assert "Traceback" not in err
    assert "[reply stopped: that turn is left out of the conversation]" in err
    assert err.count("1 sequence, ") == 1  # the second turn's reply, whole


def test_ctrl_c_at_the_prompt_ends_the_chat(smollm2_fp32, monkeypatch, capsys):
    import io

    import xpu_coopt.checkpoints

    class InterruptedStdin(io.StringIO):
        def readline(self, *args):
            raise KeyboardInterrupt

    monkeypatch.setattr(xpu_coopt.checkpoints, "load_model", lambda *args, **kwargs: smollm2_fp32)
    monkeypatch.setattr("sys.stdin", InterruptedStdin())
    assert main(["generate", "--interactive", "--dtype", "float32"]) == 0
    assert capsys.readouterr().out == ""
