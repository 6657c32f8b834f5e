"""``python -m bnlab`` is the ``bnlab`` command."""

import sys

try:
    from bnlab.cli import main
except KeyboardInterrupt:  # Ctrl-C while torch imports: a word, not a traceback
    print("\ninterrupted", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())
