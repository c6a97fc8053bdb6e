"""Data synthesis, SailorFog-QA-V2 style: knowledge graph -> subgraphs -> obfuscated questions with a
verified unique answer; the offline web built from the same graph; the tokenizer; expert trajectories.

Entry points: `pipeline.synthesize(cfg) -> World` (in memory) and `pipeline.run_synth(cfg, out_dir)`
(files). Module order, bottom up: config, names, graph, constraints, phrasing, obfuscate, sample,
questions, generate, corpus, expert, bpe, pipeline. synth imports env.tools (pages, search, visit)
and model.tokenizer (special tokens), nothing else of the engine.
"""
