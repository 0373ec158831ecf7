"""Typed configuration for raykd workflows.

Every workflow takes one pydantic model (``extra="forbid"``, so a misspelt field fails at load
time with the field's name). Configs are plain data: loading one starts nothing, and YAML is
read with ``yaml.safe_load`` so a config file can never execute code.

Override any field from the command line with dotted ``key=value`` pairs, for example
``data.sample=0.2 train.max_steps=100``; values are parsed as YAML scalars/lists.

One module per section, re-exported here (``from raykd.config import DistillConfig``):
:mod:`.base` (the strict base model, errors, seeds, the user cache, Ray), :mod:`.data`,
:mod:`.teacher`, :mod:`.labels`, :mod:`.student`, :mod:`.features` (phases, extra teachers,
generations, on-policy, TA chains, agnostic stages), :mod:`.train` (with tracking and
evaluation), :mod:`.distill` (the main job's config) and :mod:`.loading` (YAML, ``base:``
inheritance, overrides).
"""

from raykd.config.base import (
    ConfigError,
    RayConfig,
    Seeds,
    Strict,
    VocabMapping,
    check_custom_resources,
    default_cache_root,
)
from raykd.config.data import SPLITS, DataConfig
from raykd.config.distill import DistillConfig
from raykd.config.features import (
    AgnosticStageConfig,
    AssistantConfig,
    ChainConfig,
    GenerationConfig,
    MultiTeacherConfig,
    OnPolicyConfig,
    PhaseConfig,
)
from raykd.config.labels import SoftLabelConfig
from raykd.config.loading import load_config, parse_overrides, read_config_tree
from raykd.config.student import StudentConfig
from raykd.config.teacher import ClassifierTeacherConfig, TeacherAutoscalingConfig, TeacherConfig
from raykd.config.train import EvalConfig, TrackingConfig, TrainConfig

__all__ = [
    "SPLITS", "AgnosticStageConfig", "AssistantConfig", "ChainConfig", "ClassifierTeacherConfig", "ConfigError",
    "DataConfig", "DistillConfig", "EvalConfig", "GenerationConfig", "MultiTeacherConfig", "OnPolicyConfig",
    "PhaseConfig", "RayConfig", "Seeds", "SoftLabelConfig", "Strict", "StudentConfig", "TeacherAutoscalingConfig",
    "TeacherConfig", "TrackingConfig", "TrainConfig", "VocabMapping", "check_custom_resources", "default_cache_root",
    "load_config", "parse_overrides", "read_config_tree",
]
