"""Training: the loop, optimizer and schedule, resumable checkpoints, metrics and plots."""

from reasoning_llama.training.loop import TrainingDiverged, TrainResult, train

__all__ = ["TrainResult", "TrainingDiverged", "train"]
