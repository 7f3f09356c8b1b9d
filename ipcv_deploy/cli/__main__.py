"""``python -m ipcv_deploy.cli``: the same as ``ipcv-export``."""

import sys

from ipcv_deploy.cli import main

sys.exit(main())
