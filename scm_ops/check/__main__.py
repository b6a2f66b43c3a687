"""python -m scm_ops.check: the self-check (scm_ops/check/cli.py)."""
import sys

from .cli import main

sys.exit(main())
