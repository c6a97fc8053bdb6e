"""The sailor-engine command line: info, config and synth, in process through main() and once as `python -m`."""

from __future__ import annotations

import subprocess
import sys
import types
from importlib import metadata
from pathlib import Path

import pytest
import torch

from sailor_engine import cli
from sailor_engine.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples" / "tiny.yaml")


@pytest.mark.parametrize("fmt", ["yaml", "toml", "json"])
def test_config_prints_the_resolved_config(tmp_path, capsys, fmt):
    assert cli.main(["config", "--config", TINY, "--set", "train.rl.lr=2e-5", "--set", "parallel.tp=2",
                     "--format", fmt]) == 0
    out = tmp_path / f"resolved.{fmt}"
    out.write_text(capsys.readouterr().out)
    assert load_config(out) == load_config(TINY, ["train.rl.lr=2e-5", "parallel.tp=2"])


def test_config_error_exits_2_with_the_message(capsys):
    assert cli.main(["config", "--config", TINY, "--set", "parallel.tp=0"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "sailor-engine config: error: --set parallel.tp=0: parallel.tp must be >= 1, got 0\n"


def test_config_fields_lists_type_default_and_description(capsys):
    assert cli.main(["config", "--fields"]) == 0
    out = capsys.readouterr().out
    assert "parallel.tp: int >= 1 = 1\n    Tensor-parallel degree" in out
    assert "# rollout: " in out and "train.rl.lr: float > 0 = 1e-06\n" in out


def test_usage_errors_exit_2():
    for argv in ([], ["nope"], ["synth"], ["config", "--format", "xml"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2


def test_info(capsys, monkeypatch):
    import sailor_engine.model.attention as attention

    monkeypatch.setattr(attention, "backend_status", lambda: {"flash_attn": "unavailable: needs CUDA", "sdpa": "available"})
    real_version = metadata.version

    def version(name):  # an optional package that is not installed must not take info down
        if name == "uvloop":
            raise metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(metadata, "version", version)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch          {torch.__version__}\n" in out
    assert "uvloop         not installed\n" in out
    assert "Triton         interpreter (TRITON_INTERPRET=1)\n" in out
    assert "attention      flash_attn: unavailable: needs CUDA\n               sdpa: available\n" in out
    from sailor_engine.kernels import cpu_attention, cpu_decoder, cpu_flash, cpu_sample

    assert f"C kernels      attention: {cpu_attention.status()}\n" in out
    assert f"               decoder: {cpu_decoder.status()}\n" in out
    assert f"               training attention: {cpu_flash.status()}\n" in out
    assert f"               sampling: {cpu_sample.status()}\n" in out
    assert ("CUDA devices   none\n" in out) != torch.cuda.is_available()


def test_info_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "sailor_engine", "info"], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert torch.__version__ in result.stdout and "attention" in result.stdout


def test_synth_passes_its_section_and_seed(tmp_path, monkeypatch, capsys):
    calls = []
    pipeline = types.ModuleType("sailor_engine.synth.pipeline")
    pipeline.run_synth = lambda cfg, out_dir: calls.append((cfg, out_dir))
    monkeypatch.setitem(sys.modules, "sailor_engine.synth.pipeline", pipeline)
    assert cli.main(["synth", "--out", str(tmp_path), "--seed", "7", "--config", TINY,
                     "--set", "synth.num_questions=50"]) == 0
    (cfg, out_dir), = calls
    assert out_dir == tmp_path and cfg == load_config(TINY, ["synth.seed=7", "synth.num_questions=50"]).synth

    assert cli.main(["synth", "--out", str(tmp_path), "--seed", "-1"]) == 2
    assert "synth.seed must be >= 0, got -1" in capsys.readouterr().err
    assert len(calls) == 1


def test_info_lists_cuda_devices(monkeypatch):
    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, total_memory=80 * 2**30)
    cuda = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 2, get_device_properties=lambda i: props)
    rows = cli._devices(types.SimpleNamespace(cuda=cuda))
    assert rows == ["0: NVIDIA H100 80GB HBM3, sm_90, 80.0 GiB", "1: NVIDIA H100 80GB HBM3, sm_90, 80.0 GiB"]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert cli._triton_mode(cuda=True) == "GPU"
    assert cli._triton_mode(cuda=False).startswith("unavailable: no CUDA device")


def test_rft_reports_config_errors(capsys):
    assert cli.main(["rft", "--set", "train.rft.lr=-1"]) == 2
    assert "train.rft.lr must be > 0.0, got -1" in capsys.readouterr().err


def test_export_writes_a_transformers_directory(tmp_path, capsys):
    from sailor_engine.model import ModelConfig, Transformer, load_hf
    from sailor_engine.parallel.checkpoint import save_checkpoint

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2, num_kv_heads=1,
                      qkv_bias=True)
    model = Transformer(cfg).init_weights(generator=torch.Generator().manual_seed(0))
    save_checkpoint(model, tmp_path / "ckpt")
    assert cli.main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"), "--dtype", "bf16"]) == 0
    again = load_hf(tmp_path / "hf")
    assert again.embed_tokens.weight.dtype == torch.bfloat16
    for (n, a), (_, b) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(a.to(torch.bfloat16), b), n
