"""`python -m worker.sync` (worker/sync/cli.py)."""

from worker.sync.cli import main

raise SystemExit(main())
