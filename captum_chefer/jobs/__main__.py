"""``python -m captum_chefer.jobs`` (also under ``torchrun ... -m captum_chefer.jobs``)."""

import sys

from .cli import main

sys.exit(main())
