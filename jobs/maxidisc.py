"""`ray job submit` entry point for the maxidisc TA schedule search (no logic of its own).

    ray job submit --runtime-env jobs/runtime_env.yaml -- \
        python jobs/maxidisc.py --config tune/configs/minidisc_bbc.yaml --output-dir /tmp/raykd-maxidisc
"""

import sys

from raykd.cli import cli

if __name__ == "__main__":
    sys.exit(cli(["tune", "maxidisc", *sys.argv[1:]]))
