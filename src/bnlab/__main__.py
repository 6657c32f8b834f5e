"""``python -m bnlab`` is the ``bnlab`` command."""

from bnlab.cli import main

raise SystemExit(main())
