"""`ray job submit` entry point for the main job (no logic of its own).

    ray job submit --runtime-env jobs/runtime_env.yaml -- \
        python jobs/distill.py --config jobs/configs/bbc_smollm2.yaml --output-dir /tmp/raykd-demo
"""

import sys

from raykd.cli import cli

if __name__ == "__main__":
    sys.exit(cli(["distill", *sys.argv[1:]]))
