"""``python -m kvtrim.cli``: the same as the ``kvtrim`` command."""

import sys

from kvtrim.cli import main

sys.exit(main())
