"""GRPO learner: the loss (``grpo``), per-token log-probs (``logprobs``), config and batch types
(``types``) and the DeepSpeed/Ray learner ranks (``learner_actor``)."""
from .grpo import group_advantages, grpo_loss, normalize_loss_agg, truncated_importance_weights
from .types import LearnerConfig, TrainBatch

__all__ = ["LearnerConfig", "TrainBatch", "group_advantages", "grpo_loss", "normalize_loss_agg",
           "truncated_importance_weights"]
