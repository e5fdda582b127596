"""``python -m ebpo`` (and ``accelerate launch -m ebpo train ...``)."""

from ebpo.cli import main

raise SystemExit(main())
