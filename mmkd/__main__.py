"""``python -m mmkd`` is the ``mmkd`` command."""

import sys

from mmkd.cli import main

sys.exit(main())
