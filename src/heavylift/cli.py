"""The `heavylift` command: a thin dispatcher. Each command lives in heavylift/commands/."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from .commands import bench as bench_cmd
from .commands import catalog as catalog_cmd
from .commands import plan as plan_cmd
from .commands import run as run_cmd
from .errors import EXIT_USER_ERROR, HeavyliftError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Plan, load and run the largest open LLMs on the GPUs you have.")
app.command("plan")(plan_cmd.plan)
app.command("run")(run_cmd.run)
app.command("catalog")(catalog_cmd.catalog)
app.command("bench")(bench_cmd.bench)


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=False)
    except HeavyliftError as e:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {e}", markup=True)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        sys.exit(130)
    except Exception as e:  # click's own usage errors carry their exit code
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        raise
