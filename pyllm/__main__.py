"""``python -m pyllm``: the pyllm command."""

import sys

from pyllm.cli import main

sys.exit(main())
