"""Native TeleChat2: `Telechat2Config`, `Telechat2ForCausalLM` (transformers PreTrainedModel +
GenerationMixin). Importing this package registers both with the transformers Auto classes under
`model_type: telechat`, so `AutoModelForCausalLM.from_pretrained(dir)` needs no remote code."""

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_telechat2 import Telechat2Config
from .modeling_telechat2 import Telechat2ForCausalLM, Telechat2Model, Telechat2PreTrainedModel

#: the dtype names configs use (model.dtype, merge dtype, quantization compute_dtype)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

AutoConfig.register("telechat", Telechat2Config, exist_ok=True)
AutoModel.register(Telechat2Config, Telechat2Model, exist_ok=True)
AutoModelForCausalLM.register(Telechat2Config, Telechat2ForCausalLM, exist_ok=True)

__all__ = ["DTYPES", "Telechat2Config", "Telechat2ForCausalLM", "Telechat2Model", "Telechat2PreTrainedModel"]
