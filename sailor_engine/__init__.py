"""sailor-engine: train web-research agents the WebSailor way.

Synthesis (graph -> obfuscated QA + offline web), in-process ReAct rollouts on the trainer's own
weights, RFT cold start and DUPO / V2 RL through fused Triton kernels, with TP x PP x DP.
"""

__version__ = "0.1.0"
