"""Training: configs (OmegaConf, YAML + dotted overrides), one trainer for every architecture, checkpoints.

Public entry points (used by ``ttt train`` / ``ttt compare``):

* :func:`load_config` ``(path_or_name, overrides) -> TrainConfig``
* :func:`resume_config` ``(run_dir_or_config, overrides) -> TrainConfig`` (the run's saved config)
* :class:`Trainer` ``(cfg, resume=None).fit() -> summary dict``

``ttt train CONFIG key=value ... [--resume]`` runs the trainer (also under ``torchrun -m ttt train``
for DDP / FSDP2).
"""

from .checkpoint import CheckpointError
from .config import ConfigError, TrainConfig, list_configs, load_config, resume_config
from .trainer import Trainer, TrainingError

__all__ = [
    "CheckpointError",
    "ConfigError",
    "TrainConfig",
    "Trainer",
    "TrainingError",
    "list_configs",
    "load_config",
    "resume_config",
]
