"""Test-Time Training (TTT) layers and language models."""
