"""The `heavylift` command: a thin dispatcher, and the one place where errors become exit codes.

Each command lives in heavylift/commands/. The CLI library is typer, which since 0.29 bundles its own
click as `typer._click` (pyproject bounds typer to that series): its usage errors are
`typer._click.exceptions.UsageError`, not the `click` package's. main() runs the command itself rather
than through typer's standalone mode, which turns Ctrl-C into a return value and usage errors into
multi-line panels; here every outcome is decided once:

- a usage error (unknown option, bad value, unknown command): one line, exit 2;
- a HeavyliftError (a mistake the message says how to fix): one line, exit 2;
- Ctrl-C, anywhere after the command line is read (parsing, imports, planning, loading): one line, exit 130;
- anything else is a heavylift bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import typer
from rich.console import Console
from rich.markup import escape
from typer._click.exceptions import ClickException, NoSuchOption, UsageError

from . import quiet
from .commands import bench as bench_cmd
from .commands import catalog as catalog_cmd
from .commands import eval as eval_cmd
from .commands import finetune as finetune_cmd
from .commands import merge as merge_cmd
from .commands import plan as plan_cmd
from .commands import run as run_cmd
from .commands import serve as serve_cmd
from .errors import EXIT_USER_ERROR, HeavyliftError

PROG = "heavylift"
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command stopped by Ctrl-C
EXIT_BROKEN_PIPE = 1  # the reader of our output went away (`heavylift catalog | head -1`)

app = typer.Typer(add_completion=False, help="Plan, load and run the largest open LLMs on the GPUs you have.")
app.command("plan")(plan_cmd.plan)
app.command("run")(run_cmd.run)
app.command("catalog")(catalog_cmd.catalog)
app.command("bench")(bench_cmd.bench)
app.command("serve")(serve_cmd.serve)
app.command("eval")(eval_cmd.eval_)
app.command("finetune")(finetune_cmd.finetune)
app.command("merge")(merge_cmd.merge)


@app.callback(invoke_without_command=True)
def _global_options(
    ctx: typer.Context,
    verbose: bool = typer.Option(False, "-v", "--verbose",
                                 help="Show the libraries' own warnings and progress bars (torch, transformers, "
                                      "bitsandbytes, torchao). Goes before the command: heavylift -v run ..."),
) -> None:
    quiet.third_party(verbose)
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit()


def _stderr() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _fail(message: str, code: int) -> None:
    """One line on stderr, then exit with `code`."""
    _stderr().print(f"[bold red]error:[/] {escape(message)}")
    sys.exit(code)


def _sentence(text: str) -> str:
    return text if text.endswith((".", "?", "!")) else text + "."


def usage_line(error: UsageError, argv: Sequence[str]) -> str:
    """A usage error as one line: what was wrong, a guess where there is one, and where the help is."""
    ctx = error.ctx
    if isinstance(error, NoSuchOption):
        text = error.message
        if error.possibilities:
            text += f" (did you mean {' or '.join(sorted(error.possibilities))}?)"
        elif ctx is not None and ctx.parent is not None and _is_option_of(ctx.parent, error.option_name):
            text += f" ({error.option_name} goes before the command: {ctx.parent.command_path} " \
                    f"{error.option_name} {ctx.info_name} ...)"
    else:
        text = error.format_message()
    return f"{_sentence(text)} See '{_help_path(ctx, argv)} --help'."


def _help_path(ctx: typer.Context | None, argv: Sequence[str]) -> str:
    """The command whose --help answers: the error's own, else the first command named on the line (the
    parser reports some errors, such as an option missing its value, without saying where)."""
    if ctx is not None:
        return ctx.command_path
    named = [arg for arg in argv if arg in app_command().commands]
    return f"{PROG} {named[0]}" if named else PROG


def _is_option_of(ctx: typer.Context, option: str) -> bool:
    return any(option in (*p.opts, *p.secondary_opts) for p in ctx.command.params)


def app_command() -> typer.core.TyperGroup:
    """The click command typer builds from `app`."""
    return typer.main.get_command(app)


def _run(argv: Sequence[str]) -> None:
    command = app_command()
    with command.make_context(PROG, list(argv)) as ctx:
        command.invoke(ctx)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line `argv` (default: sys.argv[1:]) and exit with its status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        _run(argv)
    except HeavyliftError as e:
        _fail(str(e), EXIT_USER_ERROR)
    except UsageError as e:
        _fail(usage_line(e, argv), EXIT_USER_ERROR)
    except ClickException as e:  # the CLI library's other refusals, e.g. a file it cannot open
        _fail(e.format_message(), e.exit_code)
    except typer.Exit as e:  # --help, and commands that end early
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, typer.Abort):  # typer.Abort: Ctrl-C or end of input at one of typer's prompts
        _stderr().print("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        # Python would report the pipe again when it flushes stdout at exit; give it somewhere to flush.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_BROKEN_PIPE)
