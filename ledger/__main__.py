"""`python -m ledger`: the ops CLI (see ledger/cli.py)."""

from .cli import main

__all__: list[str] = []

raise SystemExit(main())
