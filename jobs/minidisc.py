"""`ray job submit` entry point for the minidisc TA schedule search (no logic of its own).

    ray job submit --runtime-env jobs/runtime_env.yaml -- \
        python jobs/minidisc.py --config tune/configs/minidisc_bbc.yaml --output-dir /tmp/raykd-minidisc
"""

import sys

from raykd.cli import cli

if __name__ == "__main__":
    sys.exit(cli(["tune", "minidisc", *sys.argv[1:]]))
