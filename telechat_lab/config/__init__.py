"""Every command's settings: their one typed definition (schema), the validator that reports all problems of a
config at once (validate), and the check of a command line before Hydra runs (command_line). The ground floor:
nothing here imports the data, model or training code."""

from telechat_lab.errors import ConfigError

from .command_line import check_command_line, command_line_config
from .schema import (
    SCHEMAS,
    AdapterConfig,
    ChatConfig,
    DataConfig,
    DeepSpeedConfig,
    HardwareConfig,
    InspectConfig,
    MergeConfig,
    ModelConfig,
    OptimConfig,
    QuantizationConfig,
    TrainConfig,
    register_schemas,
)
from .validate import config_problems, config_values, field_meta, validate

__all__ = [
    "SCHEMAS",
    "AdapterConfig",
    "ChatConfig",
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "HardwareConfig",
    "InspectConfig",
    "MergeConfig",
    "ModelConfig",
    "OptimConfig",
    "QuantizationConfig",
    "TrainConfig",
    "check_command_line",
    "command_line_config",
    "config_problems",
    "config_values",
    "field_meta",
    "register_schemas",
    "validate",
]
