"""C{python -m dcrouter}: the same as the C{dcrouter} command."""

import sys

from dcrouter.cli import main

sys.exit(main())
