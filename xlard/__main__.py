"""``python -m xlard``: the command line (see :mod:`xlard.cli`)."""
from xlard._entry import main

raise SystemExit(main())
