"""The CLI's error boundary: usage errors, heavylift's own errors and broken pipes, each one line on stderr."""

from __future__ import annotations

import subprocess
import sys

import pytest

from heavylift.errors import InvalidArgumentError

from conftest import run_cli

USAGE_ERRORS = [
    (["plan", "llama3.1-8b", "--gpu", "8xH100"],
     "error: No such option: --gpu (did you mean --gpus?). See 'heavylift plan --help'."),
    (["plan", "llama3.1-8b", "--context", "abc"],
     "error: Invalid value for '--context': Input should be a valid integer, unable to parse string as an integer. "
     "See 'heavylift plan --help'."),
    (["plan", "llama3.1-8b", "--context", "1e5"],
     "error: Invalid value for '--context': Input should be a valid integer, unable to parse string as an integer. "
     "See 'heavylift plan --help'."),
    (["catalog", "foo"], "error: Got unexpected extra argument(s) (foo). See 'heavylift catalog --help'."),
    (["plna"], "error: No such command 'plna'. Did you mean 'plan'? See 'heavylift --help'."),
    (["plan"], "error: Missing argument 'model'. See 'heavylift plan --help'."),
    # the parser names no command for this one: the help is the command's on the line
    (["plan", "llama3.1-8b", "--gpus"], "error: Option '--gpus' requires an argument. See 'heavylift plan --help'."),
    (["plan", "llama3.1-8b", "-v"],
     "error: No such option: -v (-v goes before the command: heavylift -v plan ...). See 'heavylift plan --help'."),
    (["--gpus", "1xH100"], "error: No such option: --gpus. See 'heavylift --help'."),
]


@pytest.mark.parametrize("args, line", USAGE_ERRORS)
def test_usage_errors_are_one_line_exit_2(capsys, args, line):
    code, out, err = run_cli(capsys, *args)
    assert (code, out, err) == (2, "", line + "\n")


def test_usage_error_as_typed_has_no_traceback():
    done = subprocess.run([sys.executable, "-m", "heavylift", "plan", "llama3.1-8b", "--gpu", "8xH100"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "error: No such option: --gpu (did you mean --gpus?). See 'heavylift plan --help'.\n"


def test_a_reserve_that_takes_a_whole_device_is_refused(capsys):
    code, out, err = run_cli(capsys, "plan", "llama3.1-8b", "--gpus", "1xH100", "--reserve", "200GiB")
    assert (code, out) == (2, "")
    assert err == ("error: --reserve 200GiB leaves nothing to plan on: H100-80GB (#0) has 79.2 GiB = 85.0 GB; "
                   "reserve less than that\n")


def test_messages_are_printed_as_written_not_as_markup(capsys, monkeypatch):
    def refuse():
        raise InvalidArgumentError("install the extra: pip install 'heavylift[plot]'")

    monkeypatch.setattr("heavylift.commands.catalog.catalog_entries", refuse)
    code, _, err = run_cli(capsys, "catalog")
    assert (code, err) == (2, "error: install the extra: pip install 'heavylift[plot]'\n")


def test_help_is_shown_and_exits_0(capsys):
    code, out, err = run_cli(capsys)
    assert code == 0 and err == "" and "Usage: heavylift [OPTIONS] COMMAND [ARGS]..." in out and "--verbose" in out
    code, out, err = run_cli(capsys, "plan", "--help")
    assert code == 0 and err == "" and "Usage: heavylift plan [OPTIONS]" in out and "--gpus" in out


def test_a_reader_that_goes_away_ends_the_command_quietly():
    # `heavylift plan ... --json | head -0`: the pipe is closed before heavylift writes to it.
    child = subprocess.Popen([sys.executable, "-m", "heavylift", "plan", "llama3.1-8b", "--gpus", "1xH100", "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child.stdout.close()
    err = child.stderr.read()
    assert child.wait(timeout=60) == 1 and err == ""
