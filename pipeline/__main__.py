"""`python -m kdpipe ...` runs the CLI (torchrun needs a module entry point)."""

from kdpipe.cli import main

main()
