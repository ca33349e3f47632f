"""``python -m xlard``: the command line (see :mod:`xlard.cli`)."""
from xlard.cli import main

raise SystemExit(main())
