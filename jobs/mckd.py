"""`ray job submit` entry point for MCKD and its baselines (no logic of its own).

    ray job submit --runtime-env jobs/runtime_env.yaml -- \
        python jobs/mckd.py --config jobs/configs/mckd_bbc.yaml --output-dir /tmp/raykd-mckd
"""

import sys

from raykd.cli import cli

if __name__ == "__main__":
    sys.exit(cli(["mckd", *sys.argv[1:]]))
