"""Logits parity with transformers (the oracle) on random tiny Llama / Qwen2 / Qwen3 configs,
and checkpoint round trips in both directions."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sailor_engine.model import Transformer, config_from_hf, load_hf, save_hf  # noqa: E402

# (family, hidden, heads, kv_heads, head_dim, tied, extra config kwargs)
CASES = [
    ("llama", 64, 4, 4, None, False, {}),
    ("llama", 72, 6, 2, None, True, {"attention_bias": True, "mlp_bias": True}),
    ("llama", 48, 4, 1, 16, False, {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 16}}),
    ("qwen2", 56, 7, 1, None, True, {}),
    ("qwen2", 96, 8, 4, None, False, {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
    ("qwen3", 40, 4, 2, 24, True, {}),
    ("qwen3", 64, 8, 8, 8, False, {"attention_bias": True}),
]


def hf_config(family, hidden, heads, kv, head_dim, tied, extra):
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[family]
    kw = dict(vocab_size=211, hidden_size=hidden, intermediate_size=hidden * 2 + 3, num_hidden_layers=2,
              num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied, max_position_embeddings=256,
              rms_norm_eps=1e-5, **extra)
    if head_dim is not None:
        kw["head_dim"] = head_dim
    return cls(**kw)


def randomize(model, seed):
    """Weights far from the default init, so every term (norm gains, biases) matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else 0.08)
            p.copy_(noise + (1.0 if "norm" in name else 0.0))
    return model


def hf_model(case, seed=0):
    cfg = hf_config(*case)
    cfg._attn_implementation = "eager"  # the oracle: plain softmax(QK^T)V, not the SDPA we use
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return randomize(model.eval(), seed)


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-h{c[1]}-{c[2]}x{c[3]}{'-tied' if c[5] else ''}" for c in CASES])
def test_load_hf_logits_match_transformers(case, tmp_path):
    ref = hf_model(case)
    ref.save_pretrained(tmp_path)  # safetensors; tied weights saved once
    ours = load_hf(tmp_path)
    ids = torch.randint(0, 211, (3, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", CASES[1:6:2], ids=["llama", "qwen2", "qwen3"])
def test_save_hf_loads_in_transformers(case, tmp_path):
    cfg = config_from_hf(hf_config(*case).to_dict())
    ours = randomize(Transformer(cfg), 3).eval()
    save_hf(ours, tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    ids = torch.randint(0, 211, (2, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= 1e-4
    # and back again: bit-identical parameters
    again = load_hf(tmp_path)
    for (n, a), (_, b) in zip(ours.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), n


def test_sharded_checkpoint_round_trip(tmp_path):
    cfg = config_from_hf(hf_config(*CASES[0]).to_dict())
    ours = randomize(Transformer(cfg), 4)
    save_hf(ours, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    again = load_hf(tmp_path, dtype=torch.bfloat16)
    assert again.embed_tokens.weight.dtype == torch.bfloat16
    for (n, a), (_, b) in zip(ours.named_parameters(), again.named_parameters()):
        assert torch.equal(a.to(torch.bfloat16), b), n
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, 211, (1, 11))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= 1e-4


def test_bad_checkpoints_are_refused_with_the_reason(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        load_hf(tmp_path)
    d = hf_config(*CASES[0]).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(d))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickled"):
        load_hf(tmp_path)
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        config_from_hf(d)


def test_missing_and_misshapen_tensors_are_named(tmp_path):
    ref = hf_model(CASES[0])
    ref.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] += 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*shape"):
        load_hf(tmp_path)
    cfg["intermediate_size"] -= 1
    cfg["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KeyError, match=r"model\.layers\.2\."):
        load_hf(tmp_path)
