#!/usr/bin/env python3
"""Reproduce the tables of Sakai et al. (arXiv:2010.12260); the same as ``popgrad reproduce``.

    python scripts/reproduce_paper.py --profile quick
    python scripts/reproduce_paper.py --profile paper --launcher submitit_slurm --dry-run
"""

import sys

from popgrad_cli.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
