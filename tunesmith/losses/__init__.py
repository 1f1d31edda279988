"""Pure loss functions: tensors in, tensors out. Imports only torch and tunesmith._core."""
from tunesmith.losses.anchor import l2_to_start, lora_update_sq_norm
from tunesmith.losses.cross_entropy import token_cross_entropy
from tunesmith.losses.logprobs import sequence_logprobs
from tunesmith.losses.preference import (
    PAIRWISE_LOSSES,
    bradley_terry,
    dpo_sigmoid,
    hinge,
    implicit_rewards,
    ipo,
    kto,
    orpo,
    simpo,
)

__all__ = [
    "PAIRWISE_LOSSES",
    "bradley_terry",
    "dpo_sigmoid",
    "hinge",
    "implicit_rewards",
    "ipo",
    "kto",
    "l2_to_start",
    "lora_update_sq_norm",
    "orpo",
    "sequence_logprobs",
    "simpo",
    "token_cross_entropy",
]
