"""Native TeleChat2: `Telechat2Config`, `Telechat2ForCausalLM` (transformers PreTrainedModel +
GenerationMixin). Importing this package registers both with the transformers Auto classes under
`model_type: telechat`, so `AutoModelForCausalLM.from_pretrained(dir)` needs no remote code."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_telechat2 import Telechat2Config
from .loading import DTYPES, load_model
from .modeling_telechat2 import Telechat2ForCausalLM, Telechat2Model, Telechat2PreTrainedModel

AutoConfig.register("telechat", Telechat2Config, exist_ok=True)
AutoModel.register(Telechat2Config, Telechat2Model, exist_ok=True)
AutoModelForCausalLM.register(Telechat2Config, Telechat2ForCausalLM, exist_ok=True)

__all__ = [
    "DTYPES",
    "load_model",
    "Telechat2Config",
    "Telechat2ForCausalLM",
    "Telechat2Model",
    "Telechat2PreTrainedModel",
]
