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
from tunesmith.rl.rewards import (CombinedReward, RewardFn, build_reward, function_reward, judge_reward, model_reward,
                                  task_reward)

__all__ = ["CombinedReward", "RewardFn", "build_reward", "function_reward", "judge_reward", "model_reward",
           "task_reward", "KLController", "gae", "group_advantages", "reinforce_baseline", "rloo", "token_rewards",
           "whiten"]
