"""Reinforcement learning with verifiable rewards (`reasoning-llama rl`): GRPO-style policy gradient.

`objective.py` holds the arithmetic (group advantages, the clipped token-level objective, the KL
estimate), `rewards.py` the answer checkers that score a sample, `rollout.py` sampling groups through
the engine and recomputing their log-probabilities with the trained model, `loop.py` the run.
"""
