"""Run several `mlx-cai` commands in one process: `python distributed_job.py '[["sft", ...], ["dpo", ...]]'`.

tests/test_distributed.py starts it under `mlx.launch -n 2` (one model load and process start for all of them).
With --report-loads, each process prints at the end one `loaded: {json}` line per model that
mlx_cai.models.load gave it: whether it was dequantized and its layer types as training left them
(tests/test_quantized_pipeline.py: the model stays quantized in every process).
"""

import json
import sys

from mlx_cai import backend  # noqa: F401  (BLAS before mlx.core)
from mlx_cai import distributed
from mlx_cai.cli import app

if __name__ == "__main__":
    loaded = []
    if "--report-loads" in sys.argv[2:]:
        from tinymodels import layer_census, record_loads

        loaded = record_loads()
    for args in json.loads(sys.argv[1]):
        app(args, standalone_mode=False)
    for model in loaded:
        print("loaded: " + json.dumps({"rank": distributed.rank(), "dequantized": model.mlx_cai_info.dequantized,
                                       "layers": layer_census(model)}), flush=True)
