"""`python -m reasoning_llama` runs the command line."""

from reasoning_llama.cli import main

main()
