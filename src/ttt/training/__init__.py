"""Training: configs (YAML + dotted overrides), one trainer for every architecture, checkpoints.

Public entry points (used by ``ttt train`` / ``ttt compare``):

* :func:`load_config` ``(path_or_name, overrides) -> TrainConfig``
* :class:`Trainer` ``(cfg, resume=None).fit() -> summary dict``
* :func:`train_main` ``(config, overrides, resume) -> summary dict``

``python -m ttt.training CONFIG key=value ... [--resume]`` runs the trainer directly (also under
``torchrun`` for DDP / FSDP2).
"""

from .checkpoint import CheckpointError
from .config import ConfigError, TrainConfig, list_configs, load_config
from .trainer import Trainer, train_main

__all__ = [
    "CheckpointError",
    "ConfigError",
    "TrainConfig",
    "Trainer",
    "list_configs",
    "load_config",
    "train_main",
]
