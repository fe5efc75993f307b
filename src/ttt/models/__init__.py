"""The TTT language model as a Hugging Face model (config, model, cache, named sizes).

Importing this package registers ``model_type="ttt"`` with ``AutoConfig``; the model classes are
registered with ``AutoModel`` / ``AutoModelForCausalLM`` as soon as a :class:`TTTConfig` is created
(which every ``Auto*.from_pretrained`` / ``from_config`` does first), so
``AutoModelForCausalLM.from_pretrained(saved_dir)`` works after ``import ttt`` while ``import ttt``
itself stays light (the modeling code, which pulls in most of ``transformers``, loads on first use).
"""

from __future__ import annotations

import importlib
from typing import Any

from .configuration_ttt import TTTConfig
from .presets import get_config, list_presets

_LAZY = {
    "CACHE_KEY": ".cache_ttt",
    "TTTCache": ".cache_ttt",
    "TTTForCausalLM": ".modeling_ttt",
    "TTTModel": ".modeling_ttt",
    "TTTPreTrainedModel": ".modeling_ttt",
}
_models_registered = False


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register_config() -> None:
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if TTTConfig.model_type not in CONFIG_MAPPING:
        AutoConfig.register(TTTConfig.model_type, TTTConfig)


def register_auto_classes() -> None:
    """Register ``TTTModel`` / ``TTTForCausalLM`` with ``AutoModel`` / ``AutoModelForCausalLM``
    (idempotent).
    """
    global _models_registered
    if _models_registered:
        return
    _register_config()
    from transformers import AutoModel, AutoModelForCausalLM

    from .modeling_ttt import TTTForCausalLM, TTTModel

    for auto, cls in ((AutoModel, TTTModel), (AutoModelForCausalLM, TTTForCausalLM)):
        try:
            auto.register(TTTConfig, cls)
        except ValueError:  # already registered
            pass
    _models_registered = True


_register_config()

__all__ = ["CACHE_KEY", "TTTCache", "TTTConfig", "TTTForCausalLM", "TTTModel", "TTTPreTrainedModel",
           "get_config", "list_presets", "register_auto_classes"]
