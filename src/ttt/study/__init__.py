"""The comparison study: TTT-Linear, TTT-MLP, Transformer, Mamba, Mamba-2 at matched size and tokens.

* :mod:`ttt.study.config`: the study's settings (:class:`StudyConfig`) and named presets;
* :mod:`ttt.study.run`: training (through :class:`ttt.training.Trainer`), evaluation, latency, resume;
* :mod:`ttt.study.report`: the markdown table, ``report.md``, ``results.json`` and the figures.
"""

from .config import STUDY_PRESETS, StudyConfig, StudyError, study_config
from .run import StudyBackend, StudyReport, TrainerBackend, TrainOutcome, run_study

__all__ = [
    "STUDY_PRESETS",
    "StudyBackend",
    "StudyConfig",
    "StudyError",
    "StudyReport",
    "TrainOutcome",
    "TrainerBackend",
    "run_study",
    "study_config",
]
