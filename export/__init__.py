"""Turning trained models into release artefacts, and the registry of tasks both sides share."""

from export.tasks import TASKS, TaskSpec, UnknownTaskError, build_model, get_task

__all__ = ["TASKS", "TaskSpec", "UnknownTaskError", "build_model", "get_task"]
