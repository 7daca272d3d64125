#!/usr/bin/env python
"""`python launch/submit.py --config CONFIG [--nodes N ...] [overrides]`: the same as `rkan-dist submit`.

Kept as a script for people who launch from a checkout; the code lives in rkan_dist.submit so that
the job submitit pickles imports from the installed package.
"""

import sys

from rkan_dist.submit import main

if __name__ == "__main__":
    sys.exit(main())
