"""forgetless: pretrain, finetune and release language models that forget less."""

import warnings

# megatron-core warns at import time that optional CUDA extensions are absent; on CPU (and on
# GPUs without them) the torch fallbacks it names are the intended path.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*not installed")
warnings.filterwarnings("ignore", message=r"full scope is deprecated")

__version__ = "0.1.0"
