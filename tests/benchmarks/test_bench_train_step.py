"""benchmarks/bench_train_step.py: its synthetic mini-batch, FLOP count and one tiny end-to-end run.

The benchmark's numbers are only as good as what it counts: the trajectories must add up to the
requested positions with prompts and tool spans masked, the matmul parameter count must equal
the one written out from the architecture, and an update must actually train (the loss at the
trained parameters differs, the fused and naive log-probs agree). The end-to-end run uses a
few hundred tokens and does not record.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_train_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_train_step"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_trajectories_add_up(bench):
    gen = torch.Generator().manual_seed(3)
    seqs = bench.trajectories(5000, 300, 97, gen)
    assert sum(len(s.token_ids) - 1 for s in seqs) == 5000
    assert all(16 <= len(s.token_ids) - 1 <= 450 for s in seqs)
    for s in seqs:
        n = len(s.token_ids)
        assert len(s.loss_mask) == n and set(s.loss_mask) == {0, 1} and max(s.token_ids) < 97
        assert not any(s.loss_mask[:max(1, n // 10)])  # the prompt
    share = sum(sum(s.loss_mask) for s in seqs) / sum(len(s.loss_mask) for s in seqs)
    assert 0.2 < share < 0.5  # policy spans ~mean/16, tool spans ~mean/8 after a 10% prompt


def test_matmul_params_from_the_architecture(bench):
    m = bench.model_config("tiny")
    model = bench.Transformer(m)
    d, kv = m.dim_per_head, m.num_kv_heads * m.dim_per_head
    per_layer = m.hidden_size * (m.num_heads * d + 2 * kv) + m.num_heads * d * m.hidden_size \
        + 3 * m.hidden_size * m.intermediate_size
    assert m.tie_word_embeddings
    assert bench.matmul_params(model) == m.num_layers * per_layer + m.vocab_size * m.hidden_size


def test_one_tiny_run(bench, capsys):
    bench.main(["--tokens", "256", "--seq-len", "64", "--micro-batch-tokens", "128", "--reps", "1", "--warmup", "0",
                "--ceiling-n", "128", "--no-record"])
    out = capsys.readouterr().out
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.split()[:1] in (["fused"], ["naive"])}
    assert set(rows) == {"fused", "naive"}
    cols = out.splitlines()[[i for i, ln in enumerate(out.splitlines()) if ln.startswith("impl")][0]].split()
    naive = dict(zip(cols, rows["naive"]))
    assert float(naive["loss_diff_vs_first"]) < 1e-6  # both log-prob paths give one loss
    assert float(dict(zip(cols, rows["fused"]))["tokens_per_s"]) > 0


def test_update_trains(bench):
    gen = torch.Generator().manual_seed(0)
    mcfg = bench.model_config("tiny")
    batch = bench.MiniBatch(bench.trajectories(256, 64, mcfg.vocab_size, gen), 128, torch.device("cpu"), gen)
    model = bench.Transformer(mcfg).init_weights(generator=torch.Generator().manual_seed(0))
    batch.attach_old_logp(model, gen)
    upd = bench.Update(model, batch, bench.LOGPROB["fused"], bench.AlgoConfig())
    upd.opt.param_groups[0]["lr"] = 1e-3
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        loss0 = float(sum(part for part, _ in upd.losses()))
    upd()
    assert float(upd.last[0]) == pytest.approx(loss0, rel=1e-5)  # the update's loss is at the old parameters
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()) if a.dim() == 2)
    with torch.no_grad():
        assert float(sum(part for part, _ in upd.losses())) < loss0  # one step downhill on its own batch


def test_results_file_has_a_cpu_record():
    path = BENCH.parent / "results" / "bench_train_step.jsonl"
    entries = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    cpu = [e for e in entries if e["config"]["model"] == "tiny"]
    assert cpu and {r["impl"] for r in cpu[-1]["rows"]} == {"fused", "naive"}
    assert all(r["tokens_per_s"] > 0 and r["peak_mb"] > 0 for r in cpu[-1]["rows"])
