"""`python -m integrity`."""

from .cli import main

main()
