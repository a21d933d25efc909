"""Pretraining objectives: random, next and next-all token prediction, and their curriculum."""

from tokenunify.objectives.curriculum import TASKS, CurriculumConfig, task_weights
from tokenunify.objectives.token_tasks import OBJECTIVES, ObjectiveConfig, TokenObjective

__all__ = ["TASKS", "OBJECTIVES", "CurriculumConfig", "ObjectiveConfig", "TokenObjective",
           "task_weights"]
