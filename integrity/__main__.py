"""`python -m integrity`."""

from integrity.cli import main

main()
