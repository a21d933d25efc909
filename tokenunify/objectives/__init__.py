"""Pretraining objectives: random, next and next-all token prediction, and their curriculum."""

from tokenunify.objectives.curriculum import TASKS, CurriculumConfig, weights
from tokenunify.objectives.tasks import OBJECTIVES, ObjectiveConfig, TokenObjective

__all__ = ["TASKS", "OBJECTIVES", "CurriculumConfig", "ObjectiveConfig", "TokenObjective",
           "weights"]
