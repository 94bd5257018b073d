"""`python -m app` is the `jobdock` command."""

from app.cli import main

main()
