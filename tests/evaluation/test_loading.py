"""Loading models from saved HF directories, trainer checkpoints and run directories."""

from __future__ import annotations

import pytest
import torch
from eval_helpers import tiny_llama

from ttt.evaluation.loading import ModelLoadError, find_model_dir, load_model
from ttt.models.registry import build_model
from ttt.training import checkpoint as C


def _fake_checkpoint(run_dir, model, arch: str, step: int) -> None:
    """A trainer checkpoint of ``model`` written by the trainer's own writer."""
    opt = torch.optim.AdamW(model.parameters())
    meta = {"arch": arch, "size": "tiny", "model_config": model.config.to_dict(),
            "config": {"data": {"seq_len": 32}}, "global_batch": 1, "seq_len": 32, "total_steps": step,
            "tokens": 0}
    trainer_state = {"step": step, "tokens": 0, "sampler": {}, "rng": C.rng_state()}
    optim = C.optimizer_state_to_named(model, opt)
    C.save_checkpoint(run_dir, step, model.state_dict(), optim, trainer_state, meta)


def test_load_saved_hf_dir(tmp_path) -> None:
    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    x = torch.randint(0, 32, (1, 8))
    with torch.no_grad():
        assert torch.allclose(loaded.model(x).logits, model.eval()(x).logits, atol=1e-6)
    assert loaded.tokenizer is None and not loaded.model.training


@pytest.mark.parametrize("arch", ["ttt-linear", "transformer"])
def test_load_trainer_checkpoint_and_run_dir(tmp_path, arch: str) -> None:
    model = build_model(arch, "tiny", vocab_size=64, max_seq_len=32, num_hidden_layers=1).eval()
    run = tmp_path / "run"
    _fake_checkpoint(run, model, arch, 5)
    _fake_checkpoint(run, model, arch, 10)
    model_dir, run_dir = find_model_dir(run)
    assert model_dir.name == "step_00000010" and run_dir == run
    loaded = load_model(run)
    assert loaded.run_config["data"]["seq_len"] == 32
    x = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        assert torch.allclose(loaded.model(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5)
    # a checkpoint directory itself also works
    assert find_model_dir(run / "checkpoints" / "step_00000005")[0].name == "step_00000005"


def test_missing_and_empty(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="no checkpoint or model directory"):
        load_model(tmp_path / "absent")
    with pytest.raises(ModelLoadError, match="holds no saved model"):
        load_model(tmp_path)
