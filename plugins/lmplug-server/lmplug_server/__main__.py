"""``python -m lmplug_server``: the same as the ``lmplug-server`` console script."""

from __future__ import annotations

import sys

from lmplug_server.cli import main

sys.exit(main())
