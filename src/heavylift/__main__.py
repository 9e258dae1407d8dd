"""`python -m heavylift` runs the CLI."""

from .cli import main

main()
