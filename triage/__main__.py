"""`python -m triage` is the `triage` command."""

import sys

from triage.cli.main import main

sys.exit(main())
