"""GRPO learner: the loss (``grpo``), per-token log-probs (``logprobs``), config and batch types
(``types``), one learner rank (``rank``) and its weights and state (``weights``)."""
