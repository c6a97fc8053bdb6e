"""The tiny world and decoder the trainer tests share (imported as tests.train.tiny).

60 entities, 1- and 2-hop questions, 21 expert trajectories; a 2-layer width-32 Qwen2-style decoder.
The tokenizer's 384 tokens are a multiple of 64 * 2, so the padded vocabulary is the same at tp=1
and tp=2. Each test file appends its own algo / rollout / train sections to MODEL_YAML.
"""

import torch

from sailor_engine.model import Transformer
from sailor_engine.parallel.checkpoint import checkpoint_config, load_checkpoint
from sailor_engine.synth.config import SynthConfig

SYNTH = SynthConfig(seed=1, num_entities=60, num_questions=60, max_hops=2, level_mix=(1, 1, 0), vocab_size=384,
                    min_pair_frequency=2, expert_max_tokens=1600, expert_min_tool_calls=1)
MODEL_YAML = """\
model: {family: qwen2, qkv_bias: true, hidden_size: 32, intermediate_size: 64, num_layers: 2, num_heads: 4,
        num_kv_heads: 2, max_position_embeddings: 2048}
synth: {expert_max_tokens: 1600}
"""


def load_trained(path) -> tuple[Transformer, torch.optim.AdamW]:
    """A trainer checkpoint's model and AdamW state, loaded the trainer's way (meta build, assign)."""
    with torch.device("meta"):
        model = Transformer(checkpoint_config(path))
    load_checkpoint(model, path, assign=True)
    opt = torch.optim.AdamW(model.parameters())
    load_checkpoint(model, path, optimizer=opt)
    return model, opt
