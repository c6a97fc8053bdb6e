"""Synthesis section of the config: the world, the question sampler, the offline web and the expert.

A frozen msgspec Struct (validated on decode, hashable); sailor_engine.config composes it with the
other sections and handles loading and overrides. Purely declarative: the pipeline reads it.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

Prob = Annotated[float, Meta(ge=0.0, le=1.0)]


class ObfuscationConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Per-constraint probability of each obfuscation operator (a constraint gets at most one)."""

    vague_date: Annotated[Prob, Meta(description="Exact year -> decade part ('early 2010s').")] = 0.5
    partial_name: Annotated[Prob, Meta(description="Named entity -> initial ('someone with the initial F').")] = 0.3
    number_range: Annotated[Prob, Meta(description="Exact number -> qualitative range ('under 1,000').")] = 0.5
    generic_descriptor: Annotated[Prob, Meta(description="Named entity -> type and category ('a coastal city').")] = 0.3
    semantic_ambiguity: Annotated[Prob, Meta(description="Relation -> a vaguer verb covering several relations.")] = 0.2
    distractor_noise: Annotated[Prob, Meta(description="Per question: add an irrelevant true-sounding clause.")] = 0.2
    structural: Annotated[Prob, Meta(description="Per question: add a structural constraint (degree, e.g. 'linked to exactly 3 works').")] = 0.15


class SynthConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Knowledge graph -> obfuscated, verified-unique QA; offline web; tokenizer; expert trajectories."""

    seed: Annotated[int, Meta(ge=0, description="Seed of every random choice; outputs are byte-identical under it.")] = 0
    graph: Annotated[str, Meta(description="'synthetic' for the seeded world generator, or a path to a triples JSONL file.")] = "synthetic"
    num_entities: Annotated[int, Meta(ge=16, description="Entities of the synthetic world (ignored for a triples file).")] = 2000
    mean_degree: Annotated[float, Meta(gt=0, description="Mean relations per entity in the synthetic world.")] = 3.0
    # V2 expansion: a local graph grown from a rare seed, then random-walk subgraphs inside it.
    expand_new_prob: Annotated[Prob, Meta(description="Expansion step continues from the newest node with this probability, else from an earlier one (cycles, dense links).")] = 0.6
    expand_edge_budget: Annotated[int, Meta(ge=1, description="Edges per expanded local graph.")] = 16
    subgraph_min_nodes: Annotated[int, Meta(ge=1, description="Fewest entities in a question's subgraph.")] = 2
    subgraph_max_nodes: Annotated[int, Meta(ge=2, le=6, description="Most entities in a question's subgraph (exact isomorphism checks enumerate up to 6! maps).")] = 4
    max_hops: Annotated[int, Meta(ge=1, le=6, description="Longest relation chain from an anchor to the answer.")] = 3
    # Questions.
    num_questions: Annotated[int, Meta(ge=1, description="Questions to emit (train + test), before synth.forced_paths and the expert filter.")] = 2000
    level_mix: Annotated[tuple[float, float, float], Meta(description="Target share of levels 1/2/3 (normalised).")] = (0.4, 0.4, 0.2)
    max_constraints: Annotated[int, Meta(ge=1, description="Most attribute constraints on one entity of a question.")] = 2
    obfuscation: Annotated[ObfuscationConfig, Meta(description="Obfuscation operator probabilities.")] = ObfuscationConfig()
    forced_paths: Annotated[bool, Meta(description="Keep only questions whose path from the named anchor to the answer is forced (each page on it names one entity for the relation taken): no candidate choice that needs clues not yet read. For small models that learn by imitation (the CPU demo); the papers' high-uncertainty questions need the default.")] = False
    test_fraction: Annotated[Prob, Meta(description="Share of tasks held out in tasks.test.jsonl (split by answer entity).")] = 0.1
    # Offline web.
    distractor_pages: Annotated[float, Meta(ge=0, description="Distractor pages per entity (near-miss names, no facts of the graph).")] = 0.1
    search_top_k: Annotated[int, Meta(ge=1, description="Results per query returned by the search tool.")] = 5
    snippet_chars: Annotated[int, Meta(ge=16, description="Characters of page text in a search result snippet.")] = 80
    # Tokenizer.
    vocab_size: Annotated[int, Meta(ge=300, description="BPE vocabulary size (special tokens and 256 byte tokens included); an upper bound under max_token_chars.")] = 4096
    max_token_chars: Annotated[int, Meta(ge=2, description="Longest BPE token in characters (leading-space marker included): keeps entity names split into sub-word pieces.")] = 5
    min_pair_frequency: Annotated[int, Meta(ge=0, description="A BPE merge needs a pair seen this often: name pieces stay shared by many names (the vocabulary may end below vocab_size).")] = 30
    # Expert trajectories (RFT cold start).
    expert_max_tokens: Annotated[int, Meta(ge=16, description="Drop expert trajectories longer than this (trained tokenizer).")] = 2048
    expert_min_tool_calls: Annotated[int, Meta(ge=0, description="Drop expert trajectories with fewer tool calls.")] = 2
    expert_fraction: Annotated[float, Meta(gt=0, le=1, description="Share of the training tasks (split by answer entity) given expert trajectories; the rest, with fresh answers, can form a disjoint RL pool (train.rl.exclude_expert_tasks).")] = 1.0

    def __post_init__(self) -> None:
        if self.subgraph_min_nodes > self.subgraph_max_nodes:
            raise ValueError(f"synth.subgraph_min_nodes ({self.subgraph_min_nodes}) must be <= "
                             f"synth.subgraph_max_nodes ({self.subgraph_max_nodes})")
        if any(w < 0 for w in self.level_mix) or sum(self.level_mix) <= 0:
            raise ValueError(f"synth.level_mix {self.level_mix} must be non-negative with a positive sum")
