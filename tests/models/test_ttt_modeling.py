"""TTTForCausalLM: forward, labels, init, save/load, Auto classes, gradient checkpointing, errors."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache
from ttt_model_helpers import VOCAB

import ttt  # noqa: F401  (registers the Auto classes)
from ttt.models import CACHE_KEY, TTTCache, TTTConfig, TTTForCausalLM, TTTModel, get_config


def test_forward_shapes_and_block_structure(make_model, variant) -> None:
    layer_type, backbone = variant
    model = make_model(layer_type, backbone)
    x = torch.randint(0, VOCAB, (3, 11))
    out = model(x, output_hidden_states=True)
    assert out.logits.shape == (3, 11, VOCAB)
    assert isinstance(getattr(out, CACHE_KEY), TTTCache)  # eval mode: use_cache defaults to config.use_cache
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    block = model.model.layers[0]
    assert (block.conv is not None) == (backbone == "mamba")
    assert block.seq_modeling_block.share_qk == block.seq_modeling_block.use_gate == (backbone == "mamba")
    assert block.seq_modeling_block.ttt_layer_type == layer_type
    model.train()
    assert getattr(model(x), CACHE_KEY) is None  # training: no cache unless asked


def test_labels_give_shifted_cross_entropy_with_ignore_index(make_model) -> None:
    model = make_model()
    x = torch.randint(0, VOCAB, (2, 9))
    labels = x.clone()
    labels[0, 3] = -100
    labels[1, :2] = -100
    out = model(x, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, VOCAB)
    expected = F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    with pytest.raises(ValueError, match="labels shape"):
        model(x, labels=labels[:, :5])


def test_initialisation_follows_spec() -> None:
    torch.manual_seed(1)
    model = TTTForCausalLM(get_config("mini", ttt_layer_type="mlp", backbone="mamba"))
    layer = model.model.layers[0].seq_modeling_block
    for w in (model.model.embed_tokens.weight, layer.q_proj.weight, layer.W1, layer.W2,
              model.model.layers[0].mlp.up_proj.weight):
        assert abs(w.std().item() - 0.02) < 0.003
    for z in (layer.b1, layer.b2, layer.learnable_ttt_lr_bias, layer.learnable_token_idx,
              layer.ttt_norm_bias):
        assert torch.count_nonzero(z) == 0
    assert torch.all(layer.ttt_norm_weight == 1) and torch.all(model.model.norm.weight == 1)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied by default


def test_untied_embeddings() -> None:
    model = TTTForCausalLM(get_config("tiny", tie_word_embeddings=False))
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_roundtrip_and_auto_classes(make_model, variant, tie, tmp_path) -> None:
    layer_type, backbone = variant
    model = make_model(layer_type, backbone, tie_word_embeddings=tie)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "ttt"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, TTTForCausalLM)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    x = torch.randint(0, VOCAB, (2, 13))
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    base = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(base, TTTModel)
    torch.testing.assert_close(base(x).last_hidden_state, model.model(x).last_hidden_state, rtol=0, atol=0)


def test_gradient_checkpointing_switch_gives_same_loss_and_grads(make_model) -> None:
    model = make_model("mlp", "mamba").train()
    assert model.supports_gradient_checkpointing
    x = torch.randint(0, VOCAB, (2, 10))
    loss = model(x, labels=x).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renamed it activation_checkpointing_*
        model.gradient_checkpointing_enable()
    assert all(block.gradient_checkpointing for block in model.model.layers)
    loss2 = model(x, labels=x, use_cache=True).loss  # the cache is updated outside the checkpointed blocks
    loss2.backward()
    torch.testing.assert_close(loss2, loss)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_remat_group_size_is_passed_to_layers() -> None:
    model = TTTForCausalLM(get_config("tiny", remat_group_size=2))
    assert all(b.seq_modeling_block.remat_group_size == 2 for b in model.model.layers)


def test_set_ttt_base_lr(make_model) -> None:
    model = make_model("mlp")
    x = torch.randint(0, VOCAB, (1, 9))
    before = model(x).logits
    model.set_ttt_base_lr(0.01)
    assert all(b.seq_modeling_block.ttt_base_lr == 0.01 for b in model.model.layers)
    assert model.config.ttt_base_lr == 0.01
    assert not torch.allclose(model(x).logits, before)
    with pytest.raises(ValueError):
        model.set_ttt_base_lr(-1)


def test_inputs_embeds_equals_input_ids(make_model) -> None:
    model = make_model()
    x = torch.randint(0, VOCAB, (2, 7))
    emb = model.get_input_embeddings()(x)
    torch.testing.assert_close(model(inputs_embeds=emb).logits, model(x).logits)


def test_logits_to_keep(make_model) -> None:
    model = make_model()
    x = torch.randint(0, VOCAB, (2, 7))
    torch.testing.assert_close(model(x, logits_to_keep=1).logits, model(x).logits[:, -1:])


def test_bad_inputs_raise_clear_errors(make_model) -> None:
    model = make_model()
    x = torch.randint(0, VOCAB, (2, 5))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, VOCAB]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="empty input"):
        model(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty input"):
        model(torch.zeros(0, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(x, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(x, attention_mask=torch.ones(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(x, attention_mask=torch.ones(2, 1, 5, 5))
    with pytest.raises(ValueError, match="input_ids"):
        model(x.float())
    with pytest.raises(ValueError, match="input_ids must be"):
        model(x[0])
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(TypeError, match="TTTCache"):
        model(x, cache=DynamicCache())
    with pytest.raises(ValueError, match="position_ids"):
        model(x, position_ids=torch.zeros(2, 3, dtype=torch.long))
    cache = getattr(model(x, use_cache=True), CACHE_KEY)
    with pytest.raises(ValueError, match="rows"):
        model(torch.randint(0, VOCAB, (3, 2)), cache=cache)
    with pytest.raises(ValueError, match="attention_mask"):
        model(x[:, :2], cache=cache, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="not both"):
        model(x[:, :2], cache=cache, past_key_values=cache.clone())
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['cache_params'\\]"):
        model(x, cache_params=cache)  # a misspelt argument is an error, never silently ignored


def test_cache_argument_accepts_its_older_name(make_model) -> None:
    """``past_key_values=`` (transformers < 5.24) and ``cache=`` continue the same state."""
    model = make_model().eval()
    x = torch.randint(0, VOCAB, (2, 9))
    full = model(x).logits
    for name in ("cache", "past_key_values"):
        cache = getattr(model(x[:, :5], use_cache=True), CACHE_KEY)
        out = model(x[:, 5:], **{name: cache})
        assert getattr(out, CACHE_KEY) is cache and cache.seen_tokens == 9
        torch.testing.assert_close(out.logits, full[:, 5:], rtol=0, atol=1e-5)


def test_config_class_is_registered() -> None:
    cfg = AutoConfig.for_model("ttt", hidden_size=32, num_attention_heads=4)
    assert isinstance(cfg, TTTConfig)
    assert isinstance(AutoModelForCausalLM.from_config(cfg), TTTForCausalLM)


def test_fresh_interpreter_import_ttt_is_enough_for_auto_loading(make_model, tmp_path) -> None:
    """``import ttt`` alone (no other ttt import) lets AutoModelForCausalLM load a saved TTT model."""
    import subprocess
    import sys

    model = make_model("mlp", "mamba")
    model.save_pretrained(tmp_path)
    x = torch.randint(0, VOCAB, (1, 6))
    torch.save({"x": x, "logits": model(x).logits}, tmp_path / "ref.pt")
    code = (
        "import sys, torch, ttt\n"
        "from transformers import AutoModelForCausalLM\n"
        f"d = {str(tmp_path)!r}\n"
        "m = AutoModelForCausalLM.from_pretrained(d).eval()\n"
        "ref = torch.load(d + '/ref.pt')\n"
        "assert type(m).__name__ == 'TTTForCausalLM', type(m)\n"
        "torch.testing.assert_close(m(ref['x']).logits, ref['logits'], rtol=0, atol=1e-5)\n"
        "print('ok')\n"
    )
    # (the child may use another thread count: fp32 results can differ in the last bits)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_gradient_checkpointing_through_a_carried_cache(make_model) -> None:
    """Back-propagation through a cache carried across calls is the same with block checkpointing."""
    model = make_model("linear", "mamba").train()
    x = torch.randint(0, VOCAB, (2, 14))

    def run() -> dict[str, torch.Tensor]:
        model.zero_grad()
        cache, total = TTTCache(), 0.0
        for s, e in ((0, 5), (5, 11), (11, 14)):
            total = total + model(x[:, s:e], labels=x[:, s:e], cache=cache, use_cache=True).loss
        total.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = run()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable()
    checkpointed = run()
    for n, g in plain.items():
        torch.testing.assert_close(checkpointed[n], g, msg=n)


@pytest.mark.parametrize("gate", [False, True])
def test_compiled_row_ops_train_like_the_references(make_model, variant, gate, monkeypatch) -> None:
    """The model's loss and every parameter gradient with the compiled RMSNorm / post-norm + gate / SwiGLU
    (the CPU default) equal those with their PyTorch references, fp32 at 1e-5 relative to each
    gradient's largest element; and the compiled autograd Functions are the ones that ran."""
    import ttt.ops.norm as norm
    import ttt.ops.swiglu as swiglu

    ttt_type, backbone = variant
    model = make_model(ttt_type, backbone, use_gate=gate).train()
    x = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))

    def loss_and_grads():
        model.zero_grad()
        loss = model(x, labels=x).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    names: list[str] = []
    for fn in (norm._RMSNormFunction, norm._GatedLayerNormFunction, swiglu._SwiGLUFunction):
        monkeypatch.setattr(fn, "apply", _recording(fn.apply, fn.__name__, names))
    loss, grads = loss_and_grads()
    assert {"_RMSNormFunction", "_SwiGLUFunction", "_GatedLayerNormFunction"} <= set(names), names
    monkeypatch.setattr(norm, "_EXT", [None])  # as without a compiler: the references
    monkeypatch.setattr(swiglu, "_EXT", [None])
    ref_loss, ref_grads = loss_and_grads()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-5, atol=1e-5 * float(ref_grads[n].abs().max()),
                                   msg=n)


def _recording(apply, name: str, names: list[str]):
    def wrapped(*args):
        names.append(name)
        return apply(*args)

    return wrapped
