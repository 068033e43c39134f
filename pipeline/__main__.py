"""`python -m pipeline ...` is `mixer ...`."""

from pipeline.cli import main

raise SystemExit(main())
