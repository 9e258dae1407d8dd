"""One module per `heavylift` command: parse options, call the library, render."""
