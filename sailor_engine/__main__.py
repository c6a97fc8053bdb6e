"""`python -m sailor_engine ...` is the `sailor-engine` command."""

import sys

from sailor_engine.cli import main

sys.exit(main())
