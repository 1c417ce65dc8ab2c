"""`python -m pipeline ...` runs the CLI (torchrun needs a module entry point)."""

from pipeline.cli import main

main()
