"""sailor_engine.kernels: fused kernels for RL training, usable without the rest of the engine.

Depends on torch and triton only, so another trainer (TRL, verl, a plain PyTorch loop) can embed it:

    from sailor_engine.kernels import fused_linear_logprob, policy_loss

    logp = fused_linear_logprob(hidden, lm_head.weight, targets, temperature=1.0)      # (N,), no (N, V)
    per_token, stats = policy_loss(logp, old_logp, advantages, loss_mask, eps_low=0.2, eps_high=0.28)
    loss = per_token.sum() / num_loss_tokens_of_the_whole_step

Also `decode_attention`: one-token attention over a slab KV cache, read in place with rows and
lengths as device tensors (no host synchronisation: a decode step can be captured in a CUDA graph).

Triton on CUDA; on CPU a chunked PyTorch path with the same memory profile. Each kernel's plain
PyTorch specification is in `sailor_engine.kernels.reference`.
"""

if __name__ != "sailor_engine.kernels":  # e.g. `kernels`, found first on sys.path from the checkout's root
    raise ImportError(
        f"{__file__} is the source of sailor_engine.kernels, imported here as the top-level package {__name__!r} "
        "because the sailor-engine checkout's root is on sys.path (python adds the working directory when "
        "started there). It shadows any installed package of that name: transformers imports Hugging Face's "
        "`kernels`. Start python with -P (or PYTHONSAFEPATH=1), or from another directory."
    )

from .decode_attention import decode_attention
from .logprob import fused_linear_logprob
from .policy_loss import PolicyLossStats, policy_loss

__all__ = ["PolicyLossStats", "decode_attention", "fused_linear_logprob", "policy_loss"]
