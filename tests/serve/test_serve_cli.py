"""`heavylift serve` as a command: its mistakes in one line with exit code 2, and Ctrl-C."""

from __future__ import annotations

import signal
import socket

import pytest

from conftest import run_cli

from .conftest import CONTEXT, SMALL_CONTEXT, STOP_S, Server, free_port, openai_client


@pytest.mark.parametrize("args, message", [
    (["--max-seqs", "many"], "--max-seqs must be auto or a whole number from 1 to 256, not 'many'"),
    (["--max-seqs", "0"], "--max-seqs must be auto or a whole number from 1 to 256, not '0'"),
    (["--port", "70000"], "Invalid value for '--port': Input should be less than or equal to 65535. "
                          "See 'heavylift serve --help'."),
    (["--max-queue", "-1"], "Invalid value for '--max-queue': Input should be greater than or equal to 0. "
                            "See 'heavylift serve --help'."),
    (["--quant", "int3"], "--quant must be auto or one of bf16, fp16, fp8, int8, nf4, nf4-dq, fp4, not 'int3'"),
    (["--prefill-chunk", "8"], "Invalid value for '--prefill-chunk': Input should be greater than or equal to 16. "
                               "See 'heavylift serve --help'."),
])
def test_argument_mistakes_are_one_line(capsys, checkpoint, args, message):
    code, out, err = run_cli(capsys, "serve", str(checkpoint), *args)
    assert (code, out, err) == (2, "", f"error: {message}\n")


def test_a_plan_that_does_not_fit_stops_before_listening(capsys, checkpoint, monkeypatch):
    import heavylift.hardware.detect as detect
    from heavylift.hardware.gpus import cpu_device

    monkeypatch.setattr(detect, "detect_devices", lambda: (cpu_device(300_000),))  # 0.3 MB of RAM
    code, out, err = run_cli(capsys, "serve", str(checkpoint), "--quant", "bf16", "--context", "64")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("error: ") and "in bf16 does not fit" in err


def test_a_port_in_use_is_one_line(capsys, checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = run_cli(capsys, "serve", str(checkpoint), "--context", str(CONTEXT), "--port", str(port))
    assert (code, out) == (2, "")
    assert err == f"error: cannot listen on 127.0.0.1:{port} (Address already in use); pick another --port or " \
                  "stop what holds it\n"


def test_ctrl_c_lets_a_stream_finish_then_says_stopped(checkpoint, tmp_path):
    """A stream in flight when Ctrl-C comes completes (1,000 tokens take about 2 s, within the drain's
    SERVE_DRAIN_SECONDS); then the server says "stopped" and exits 0."""
    server = Server([str(checkpoint), "--context", str(SMALL_CONTEXT), "--max-seqs", "2"], tmp_path / "stderr.txt")
    try:
        stream = openai_client(server).completions.create(model=str(checkpoint), prompt="hello world",
                                                          max_tokens=1000, temperature=0, stream=True)
        chunks = iter(stream)
        next(chunks)
        server.process.send_signal(signal.SIGINT)
        rest = [chunk.choices[0] for chunk in chunks]
        code = server.process.wait(timeout=STOP_S)
    finally:
        server.stop()
    assert rest and rest[-1].finish_reason == "length"  # chunks came after Ctrl-C, up to the last
    assert code == 0
    assert server.stderr().strip().splitlines()[-1] == "stopped" and "Traceback" not in server.stderr()


def test_listening_beyond_loopback_without_a_key_warns(capsys, checkpoint, monkeypatch):
    """The check itself on sockets (an unbound one reports 0.0.0.0), and its one warning line, with the
    server's start replaced so that nothing listens beyond loopback here."""
    import heavylift.commands.serve as serve_cmd

    with socket.socket() as anywhere, socket.socket() as here:
        here.bind(("127.0.0.1", 0))
        assert serve_cmd.beyond_loopback(anywhere) and not serve_cmd.beyond_loopback(here)
    monkeypatch.setattr(serve_cmd, "beyond_loopback", lambda sock: True)
    monkeypatch.setattr(serve_cmd, "_serve", lambda *args: None)
    port = free_port()
    code, _, err = run_cli(capsys, "serve", str(checkpoint), "--context", str(CONTEXT), "--port", str(port))
    assert code == 0
    assert err == f"warning: listening on 127.0.0.1:{port} without --api-key: anyone who reaches this port can use " \
                  "the model\n"
    code, _, err = run_cli(capsys, "serve", str(checkpoint), "--context", str(CONTEXT), "--port", str(port),
                           "--api-key", "k")
    assert (code, err) == (0, "")


def test_max_seqs_auto_is_the_planners_answer(capsys, checkpoint, monkeypatch):
    """On a machine of 1.5 MB (the tiny model's weights are 0.8 MB), auto serves as many sequences of the
    context as the plan says fit, and the loaded plan is for that many."""
    import heavylift
    import heavylift.commands.serve as serve_cmd
    import heavylift.hardware.detect as detect
    from heavylift.hardware.gpus import cpu_device

    machine = (cpu_device(1_500_000),)
    monkeypatch.setattr(detect, "detect_devices", lambda: machine)
    served = {}
    monkeypatch.setattr(serve_cmd, "_serve", lambda err, prepared, tokenizer, seqs, *rest:
                        served.update(seqs=seqs, batch=prepared.plan.batch, quant=prepared.scheme.quant))
    code, _, err = run_cli(capsys, "serve", str(checkpoint), "--context", str(CONTEXT), "--engine", "fast",
                           "--port", str(free_port()))
    assert code == 0, err
    fits = heavylift.plan(str(checkpoint), gpus=machine, context=CONTEXT, quant=served["quant"], serve=True,
                          engine="fast").scheme(served["quant"]).max_concurrent_sequences
    assert 1 < fits < 256 and served == {"seqs": fits, "batch": fits, "quant": served["quant"]}
