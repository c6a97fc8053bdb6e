"""The agent's environment: tools behind one protocol (protocol.py), the offline web (tools.py), the
tool runner and sandbox. Nothing is imported here, so `import sailor_engine.env.protocol` does not
pull in bm25s (absent on the GPU hosts unless carried)."""
