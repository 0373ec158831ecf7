"""`ray job submit` entry point for MUKI and its baselines (no logic of its own).

    ray job submit --runtime-env jobs/runtime_env.yaml -- \
        python jobs/muki.py --config jobs/configs/muki_bbc.yaml --output-dir /tmp/raykd-muki
"""

import sys

from raykd.cli import cli

if __name__ == "__main__":
    sys.exit(cli(["muki", *sys.argv[1:]]))
