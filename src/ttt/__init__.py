"""Test-Time Training (TTT) layers and language models."""

# Registers model_type "ttt" with the transformers Auto classes (light: the modeling code loads on first use).
from . import models as models
