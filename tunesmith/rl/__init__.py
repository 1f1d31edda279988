"""Online RL: advantage estimators, the KL controller, reward sources and rollouts."""
from tunesmith.rl.advantages import (
    KLController,
    gae,
    group_advantages,
    reinforce_baseline,
    rloo,
    token_rewards,
    whiten,
)

__all__ = ["KLController", "gae", "group_advantages", "reinforce_baseline", "rloo", "token_rewards", "whiten"]
