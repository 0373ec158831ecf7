"""`ray job submit` entry point for the main job (no logic of its own).

    ray job submit --runtime-env jobs/runtime_env.yaml -- \
        python jobs/distill.py --config jobs/configs/bbc_smollm2.yaml --output-dir /tmp/raykd-demo

The job's ``python`` is the first one on the ``PATH`` of the cluster's head node: start the
cluster from raykd's environment (``raykd teacher up`` does; or ``ray start --head`` with the
virtualenv activated), or the job runs a Python without raykd.
"""

import sys

try:
    from raykd.cli import cli
except ImportError as e:  # the cluster's Python is not raykd's: say which one ran and how to fix it
    sys.exit(f"error: {e} in {sys.executable}, the `python` this Ray cluster runs jobs with. Start the cluster "
             "from raykd's environment (`raykd teacher up`, or `ray start --head` with its virtualenv activated), "
             "or install raykd into that Python.")

if __name__ == "__main__":
    sys.exit(cli(["distill", *sys.argv[1:]]))
