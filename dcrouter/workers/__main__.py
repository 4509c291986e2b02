"""C{python -m dcrouter.workers}: one router process, started by the supervisor."""

import sys

from dcrouter.workers.worker import main

sys.exit(main(sys.argv[1:]))
