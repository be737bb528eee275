"""Run under torchrun: `zero_check.py RUNS.json` runs each finetune of RUNS.json (a list of
argument lists) in turn in one job, so that the DeepSpeed runs share one start-up."""

import json
import sys

from forgetless import config
from forgetless.config import FinetuneConfig
from forgetless.recipes import finetune

if __name__ == "__main__":
    for args in json.loads(open(sys.argv[1]).read()):
        finetune.run(config.load(FinetuneConfig, None, args))
