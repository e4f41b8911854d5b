"""``python -m saebridge`` runs the command line."""

from saebridge.cli import main

raise SystemExit(main())
