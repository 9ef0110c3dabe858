"""``python -m dasgd`` is the ``dasgd`` command."""

import sys

from .cli import main

sys.exit(main())
