"""The config layer: schema (every default once), names of the components, validation.

Imports nothing else of opd_exp; every other layer may import it.
"""

from opd_exp.config.errors import ConfigError, RunStopped
from opd_exp.config.schema import (GROUP_SCHEMAS, Config, register_configs, schema_cfg,
                                   sequences_per_rank)
from opd_exp.config.validate import validate, validate_training, validate_vocab, zero_stage

__all__ = ["ConfigError", "RunStopped", "Config", "GROUP_SCHEMAS", "register_configs", "schema_cfg",
           "sequences_per_rank", "validate", "validate_training", "validate_vocab", "zero_stage"]
