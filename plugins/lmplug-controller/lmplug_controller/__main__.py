"""``python -m lmplug_controller``: the same as the ``lmplug-controller`` command."""

from __future__ import annotations

import sys

from lmplug_controller.cli import main

sys.exit(main())
