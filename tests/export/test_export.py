"""``ttt export``: a run becomes a self-contained Hugging Face model directory (issue 10, point 2)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from export_helpers import make_run, run_clean
from typer.testing import CliRunner

from ttt.cli import app
from ttt.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from ttt.models import TTTForCausalLM
from ttt.models.remote_code import AUTO_MAP, bundle_sources, flat_name

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("export")
    run = make_run(root)
    res = runner.invoke(app, ["export", str(run), str(root / "out")])
    assert res.exit_code == 0, res.output
    assert "step 2" in res.output
    return run, root / "out"


def test_export_directory_contents(exported) -> None:
    run, out = exported
    config = json.loads((out / "config.json").read_text())
    tok = load_tokenizer(run / "tokenizer")
    assert config["use_cache"] is True
    assert config["auto_map"] == AUTO_MAP
    assert config["eos_token_id"] == tok.eos_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert config["bos_token_id"] == tok.bos_token_id and config["pad_token_id"] == tok.pad_token_id
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_token_id and gen.get("use_cache", True) is True
    assert tokenizer_fingerprint(load_tokenizer(out)) == tokenizer_fingerprint(tok)
    card = (out / "README.md").read_text()
    assert "trust_remote_code=True" in card and "validation loss | 3.0000" in card  # step 2 val loss
    assert "ttt-linear (tiny)" in card and "bpe" in card and "training tokens | 128" in card
    assert json.loads((out / "ttt_run.json").read_text())["step"] == 2
    assert not list(out.parent.glob(".out.tmp-*"))  # written under a temporary name, then renamed
    for name in bundle_sources():
        assert (out / name).is_file(), name


def test_export_loads_in_clean_subprocess_without_ttt(exported, tmp_path) -> None:
    """The export works with plain transformers: no ``ttt`` on the path, warnings are errors."""
    run, out = exported
    model = TTTForCausalLM.from_pretrained(run)  # the run directory itself (latest checkpoint)
    x = torch.tensor([[5, 17, 3, 99, 250, 7, 8, 1, 2]])
    with torch.no_grad():
        ref_logits = model(x).logits
        ref_gen = model.generate(x, max_new_tokens=6, do_sample=False)
    torch.save({"x": x}, tmp_path / "x.pt")
    code = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out, inp, dst = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(out)
model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
assert type(model).__module__.startswith('transformers_modules.'), type(model).__module__
assert model.config.use_cache and model.generation_config.eos_token_id == tok.eos_token_id
x = torch.load(inp)['x']
with torch.no_grad():
    logits = model(x).logits
    gen = model.generate(x, max_new_tokens=6, do_sample=False)
torch.save({'logits': logits, 'gen': gen, 'ids': tok('ROMEO: hello').input_ids}, dst)
# the compiled paths are off in the copy: the conv never tried to build, the builder is not bundled
conv = [m for n, m in sys.modules.items()
        if n.startswith('transformers_modules.') and n.endswith('.ops_conv')]
assert conv and conv[0]._EXT == [] and conv[0]._extension() is None, conv
lin = [m for n, m in sys.modules.items() if n.endswith('.ops_linear')]
assert lin and lin[0]._EXT == [] and not lin[0].packing_available(), lin
assert not any(n.endswith('ops_extension') or n.endswith('_scan_cpp_scan') for n in sys.modules)
"""
    res = run_clean(code, str(out), str(tmp_path / "x.pt"), str(tmp_path / "got.pt"))
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.load(tmp_path / "got.pt")
    torch.testing.assert_close(got["logits"], ref_logits, rtol=0, atol=1e-5)
    assert torch.equal(got["gen"], ref_gen)
    assert got["ids"] == load_tokenizer(run / "tokenizer")("ROMEO: hello").input_ids


def test_from_pretrained_run_and_checkpoint_dirs(exported) -> None:
    run, out = exported
    latest = TTTForCausalLM.from_pretrained(run)
    step1 = TTTForCausalLM.from_pretrained(run / "checkpoints" / "step_00000001")
    hf = TTTForCausalLM.from_pretrained(out)
    assert latest.config.use_cache is True
    x = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(latest(x).logits, hf(x).logits, rtol=0, atol=0)
        assert not torch.allclose(step1(x).logits, hf(x).logits)
    # the weights are the checkpoint's, not a fresh initialisation
    from safetensors.torch import load_file

    saved = load_file(str(run / "checkpoints" / "step_00000002" / "model.safetensors"))
    torch.testing.assert_close(latest.state_dict()["model.layers.0.seq_modeling_block.W1"],
                               saved["model.layers.0.seq_modeling_block.W1"], rtol=0, atol=0)


def test_export_step_and_errors(exported, tmp_path) -> None:
    run, out = exported
    res = runner.invoke(app, ["export", str(run), str(tmp_path / "s1"), "--step", "1"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "s1" / "ttt_run.json").read_text())["step"] == 1
    cases = [
        (["export", str(run), str(out)], "already exists"),
        (["export", str(run), str(tmp_path / "s7"), "--step", "7"], "no checkpoint of step 7"),
        (["export", str(tmp_path / "nothing"), str(tmp_path / "o")], "not a training run"),
    ]
    for args, msg in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and msg in res.output, res.output
        assert "Traceback" not in res.output


def test_export_run_without_saved_tokenizer_is_refused(tmp_path) -> None:
    """A BPE run that does not hold its tokenizer cannot be exported (the tokenizer would be guessed)."""
    run = make_run(tmp_path, save_tok=False, steps=(1,))
    res = runner.invoke(app, ["export", str(run), str(tmp_path / "o")])
    assert res.exit_code == 2 and "no saved tokenizer" in res.output, res.output


def test_bundle_is_generated_from_the_package() -> None:
    files = bundle_sources()
    assert {"configuration_ttt.py", "modeling_ttt.py", "ops_scan.py", "layers_ttt_layer.py"} <= set(files)
    for name, text in files.items():
        for node in ast.walk(ast.parse(text)):  # no import of this package itself
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert not (node.module or "").startswith("ttt"), (name, node.module)
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "ttt" for a in node.names), name
        for line in text.splitlines():  # every relative import names a bundled file
            if line.lstrip().startswith("from ."):
                target = line.split()[1][1:]
                assert f"{target}.py" in files, (name, line)
    # the copy of modeling_ttt.py is the package's file with only its imports rewritten
    import ttt.models.modeling_ttt as mod

    original = Path(mod.__file__).read_text()
    body = files["modeling_ttt.py"].split("class TTTRMSNorm", 1)[1]
    assert body == original.split("class TTTRMSNorm", 1)[1]
    assert flat_name("ttt.ops.scan.torch_scan") == "ops_scan_torch_scan"
    assert "def resolve_backend" in files["ops_scan.py"].rsplit("exported model", 1)[1]

    # the compiled conv / Triton decode are switched off by generated overrides, the builder is stubbed
    assert "def _extension():" in files["ops_conv.py"].rsplit("exported model", 1)[1]
    for name in ("ops_norm.py", "ops_swiglu.py", "ops_linear.py"):
        assert "def _extension():" in files[name].rsplit("exported model", 1)[1], name
        assert "from .ops_extension" not in files[name], name
    assert "def _fused_decoder(" in files["ops_decode.py"].rsplit("exported model", 1)[1]
    assert "ops_extension.py" not in files and "from .ops_extension" not in files["ops_conv.py"]


def test_bundle_generator_fails_loudly_when_a_hook_point_disappears(monkeypatch) -> None:
    from ttt.models import remote_code

    required, text = remote_code._OVERRIDES["ttt.ops.conv"]
    monkeypatch.setitem(remote_code._OVERRIDES, "ttt.ops.conv", (("def _gone_hook(",), text))
    with pytest.raises(remote_code.RemoteCodeError, match="_gone_hook"):
        bundle_sources()
    monkeypatch.setitem(remote_code._OVERRIDES, "ttt.ops.conv", (required, text))
    monkeypatch.setitem(remote_code._STUBS, ("ttt.ops.decode", "ttt.ops.extension"), "x = 1\n")
    with pytest.raises(remote_code.RemoteCodeError, match="no longer imports"):
        bundle_sources()


def test_changed_run_tokenizer_is_refused_by_checkpoint_checksums(tmp_path) -> None:
    """The run's tokenizer files are covered by the checkpoint's checksums (meta.json tokenizer_files):
    export / eval / generate refuse a run whose tokenizer changed after training."""
    from ttt.training.checkpoint import CheckpointError, open_checkpoint

    run = make_run(tmp_path, steps=(1,))
    info = open_checkpoint(run)
    assert set(info.meta["tokenizer_files"]) >= {"tokenizer.json", "tokenizer_config.json"}
    assert len(info.meta["tokenizer_sha256"]) == 64
    tok_file = run / "tokenizer" / "tokenizer.json"
    tok_file.write_text(tok_file.read_text().replace('"ROMEO', '"JULIET', 1) + " ")
    with pytest.raises(CheckpointError, match="tokenizer.json differs"):
        open_checkpoint(run)
    for args in (["export", str(run), str(tmp_path / "o")], ["eval", str(run), "--out", str(tmp_path / "e")],
                 ["generate", str(run), "--prompt", "a", "--max-new-tokens", "2"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and "differs from the one this checkpoint was trained with" in res.output, (
            args, res.output)
        assert "Traceback" not in res.output
