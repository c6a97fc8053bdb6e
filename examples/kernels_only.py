"""Only the kernels, in a plain PyTorch training loop: fused LM-head log-probs + the clipped policy loss.

    python examples/kernels_only.py            # CPU, a few seconds

`sailor_engine.kernels` needs torch and triton only; nothing else of the engine is imported here.
The toy model is any nn.Module that returns hidden states: the LM head's weight goes to
fused_linear_logprob, which returns log p(target) per token without materialising (tokens, vocab)
logits; policy_loss returns the clip-higher GRPO loss per token, and the aggregation (here
token-mean over the batch) is the caller's. On CUDA both run Triton kernels; on CPU the same
algorithms in chunked PyTorch (impl="auto" picks). Each step is checked against the same loss
and gradients written in plain PyTorch (full logits, log_softmax, the clipped surrogate).

The step is GRPO-shaped: G sampled completions per prompt, their sampling log-probs (old_logp),
group-normalised advantages, the prompt masked out of the loss. Two updates per rollout batch,
so the second sees ratio != 1 and clipping can bind.
"""

from __future__ import annotations

import torch
from torch import nn

from sailor_engine.kernels import fused_linear_logprob, policy_loss

VOCAB, HIDDEN, PROMPTS, G, PROMPT_LEN, LEN = 512, 64, 4, 4, 8, 32
EPS_LOW, EPS_HIGH = 0.2, 0.28


class ToyLM(nn.Module):
    """Embedding -> one causal Transformer layer -> final norm; the LM head is a separate Linear."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.block = nn.TransformerEncoderLayer(HIDDEN, nhead=4, dim_feedforward=4 * HIDDEN, dropout=0.0,
                                                batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, H)
        mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1])
        return self.norm(self.block(self.embed(ids), src_mask=mask, is_causal=True))


def rollout_batch(model: ToyLM, gen: torch.Generator) -> dict:
    """Stand-in for rollouts: random token ids, their log-probs under the current policy, rewards."""
    ids = torch.randint(0, VOCAB, (PROMPTS * G, LEN + 1), generator=gen)
    ids[:, :PROMPT_LEN] = ids[::G, :PROMPT_LEN].repeat_interleave(G, dim=0)  # G completions share a prompt
    inputs, targets = ids[:, :-1], ids[:, 1:]
    mask = torch.zeros(PROMPTS * G, LEN)
    mask[:, PROMPT_LEN - 1:] = 1.0  # loss on completion tokens only
    with torch.no_grad():
        old_logp = fused_linear_logprob(model.hidden(inputs), model.lm_head.weight, targets)
    rewards = torch.rand(PROMPTS, G, generator=gen).round()  # 0/1 correctness
    adv = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)  # GRPO
    return {"inputs": inputs, "targets": targets, "mask": mask, "old_logp": old_logp, "adv": adv.reshape(-1)}


def kernel_loss(model: ToyLM, b: dict) -> tuple[torch.Tensor, dict]:
    logp = fused_linear_logprob(model.hidden(b["inputs"]), model.lm_head.weight, b["targets"])  # (B, T) fp32
    per_token, stats = policy_loss(logp, b["old_logp"], b["adv"], b["mask"], eps_low=EPS_LOW, eps_high=EPS_HIGH)
    return per_token.sum() / b["mask"].sum(), stats.as_dict()  # token-mean over the batch


def plain_loss(model: ToyLM, b: dict) -> torch.Tensor:
    """The same loss without the kernels: full logits, log_softmax, gather, the clipped surrogate."""
    logits = model.lm_head(model.hidden(b["inputs"])).float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, b["targets"][..., None])[..., 0]
    ratio = torch.exp(logp - b["old_logp"])
    a = b["adv"][:, None]
    per_token = torch.maximum(-a * ratio, -a * ratio.clamp(1 - EPS_LOW, 1 + EPS_HIGH))
    return (per_token * b["mask"]).sum() / b["mask"].sum()


def main() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = ToyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    params = list(model.parameters())
    for step in range(3):
        batch = rollout_batch(model, gen)
        for update in range(2):
            loss, stats = kernel_loss(model, batch)
            grads = torch.autograd.grad(loss, params)
            want = plain_loss(model, batch)
            want_grads = torch.autograd.grad(want, params)
            torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
            for g, w in zip(grads, want_grads):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            opt.zero_grad(set_to_none=True)
            print(f"step {step} update {update}: loss {loss.item():+.6f} (plain PyTorch {want.item():+.6f})  "
                  f"clip low {stats['clip_frac_low'].item():.3f} high {stats['clip_frac_high'].item():.3f}  "
                  f"ratio max {stats['ratio_max'].item():.3f}")
    print("kernels match plain PyTorch: loss and every parameter gradient")


if __name__ == "__main__":
    main()
