"""Run several `mlx-cai` commands in one process: `python distributed_job.py '[["sft", ...], ["dpo", ...]]'`.

tests/test_distributed.py starts it under `mlx.launch -n 2` (one model load and process start for all of them).
"""

import json
import sys

from mlx_cai import backend  # noqa: F401  (BLAS before mlx.core)
from mlx_cai.cli import app

if __name__ == "__main__":
    for args in json.loads(sys.argv[1]):
        app(args, standalone_mode=False)
