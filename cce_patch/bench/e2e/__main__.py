"""``python -m cce_patch.bench.e2e``: see ``cli.py``."""

from .cli import main

raise SystemExit(main())
