"""Seeds: every step and every evaluation reseeds the global RNG from (trainer.seed, step), so a
resumed run samples exactly what a straight run would have."""


def step_seed(seed: int, step: int, purpose: int = 0, rank: int = 0) -> int:
    """purpose 0: the step's rollouts; 1: the evaluation at that step; 2: prompt scoring (step 0,
    before training). Ranks draw apart."""
    return (seed * 1_000_003 + step * 101 + purpose + rank * 7_919) % (2**63)
