"""``python -m stag_relay``: the same command line as ``stag-relay``."""

import sys

from stag_relay.service.cli import main

if __name__ == "__main__":
    sys.exit(main())
