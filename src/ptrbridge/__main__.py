"""``python -m ptrbridge``: see :mod:`ptrbridge.cli`."""
import sys

from .cli import main

sys.exit(main())
