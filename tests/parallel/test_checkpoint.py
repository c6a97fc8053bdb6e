"""Sharded checkpoints: round trips across tp layouts under torchrun, HF export checked by transformers;
an interrupted save leaves a directory that is refused, never a half-new checkpoint."""

from pathlib import Path

import msgspec
import pytest
import torch

from sailor_engine.model import ModelConfig, Transformer
from sailor_engine.parallel import checkpoint as ckpt

CFG = ModelConfig(family="qwen3", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2,
                  num_kv_heads=1, head_dim=16, qk_norm=True, tie_word_embeddings=False)


def model(seed):
    return Transformer(CFG).init_weights(generator=torch.Generator().manual_seed(seed))


@pytest.mark.dist
def test_round_trips_across_tp_layouts_and_export(run_workers):
    pytest.importorskip("transformers")
    out = run_workers(Path(__file__).with_name("tp_checkpoint_worker.py"))
    assert "checkpoints round-trip across layouts" in out, out


def test_single_process_round_trip(tmp_path):
    ref = model(0)
    ckpt.save_checkpoint(ref, tmp_path)
    got = ckpt.load_checkpoint(model(1), tmp_path)
    for (n, a), (_, b) in zip(ref.named_parameters(), got.named_parameters()):
        assert torch.equal(a, b), n
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "model-tp00-of-01.safetensors"]


def test_interrupted_save_is_refused(tmp_path, monkeypatch):
    ckpt.save_checkpoint(model(0), tmp_path)  # a complete checkpoint ...

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(model(1), tmp_path)  # ... overwritten by a save that dies mid-way
    assert [p.name for p in tmp_path.iterdir()] == ["model-tp00-of-01.safetensors"]  # no temp file left
    with pytest.raises(FileNotFoundError, match="incomplete one"):
        ckpt.load_checkpoint(model(2), tmp_path)


def test_config_mismatch_names_the_field(tmp_path):
    ckpt.save_checkpoint(model(0), tmp_path)
    other = Transformer(msgspec.structs.replace(CFG, rms_norm_eps=1e-5))
    with pytest.raises(ValueError, match="differs from the model's in rms_norm_eps"):
        ckpt.load_checkpoint(other, tmp_path)


def test_optimizer_round_trip_and_refusals(tmp_path):
    ref = model(0)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    ref(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    ckpt.save_checkpoint(ref, tmp_path / "with", optimizer=opt, extra={"step": 1})
    ckpt.save_checkpoint(ref, tmp_path / "without")
    other = model(1)
    opt2 = torch.optim.SGD(other.parameters(), lr=0.5, momentum=0.9)
    ckpt.load_checkpoint(other, tmp_path / "with", optimizer=opt2)
    assert opt2.param_groups[0]["lr"] == 0.1 and ckpt.read_manifest(tmp_path / "with")["extra"] == {"step": 1}
    for p, q in zip(ref.parameters(), other.parameters()):
        assert torch.equal(opt.state[p]["momentum_buffer"], opt2.state[q]["momentum_buffer"])
    with pytest.raises(ValueError, match="holds no optimizer state"):
        ckpt.load_checkpoint(other, tmp_path / "without", optimizer=opt2)
    stray = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    with pytest.raises(ValueError, match=r"optimizer holds a tensor \(3,\) that is not a parameter of the model"):
        ckpt.save_checkpoint(ref, tmp_path / "stray", optimizer=stray)
    assert not (tmp_path / "stray").exists()  # refused before touching the disk
