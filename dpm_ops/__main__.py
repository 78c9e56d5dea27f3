"""``python -m dpm_ops`` = the ``dpm-reid`` command."""

import sys

from dpm_ops.cli import main

sys.exit(main())
