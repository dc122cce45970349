import sys

from stag_relay.tools.sink.cli import main

sys.exit(main())
