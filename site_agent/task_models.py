"""Which model a site's task trains: the site's own copy of its study spec (with the run's
preprocessing), else the registry task its data schema declares.

Nothing about the model is taken from the message: a run of a study is trained only when
it pins the content hash of the site's copy. Pure functions of the site's study, data and
a task's config; the warm trainer keeps the rows they hand back for the task at hand.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from fedward.preprocessing import (
    Preprocessing,
    PreprocessingError,
    fill_missing,
    imputed_features,
)
from fedward.study import StudySpec
from fedward.tasks import TaskRef, TaskSpec, UntrainableStudyError, get_task, study_task
from fedward.wire import CFG, SiteErrorCode
from site_agent.data import SiteData
from site_agent.task_errors import TaskError

__all__ = ["own_task", "preprocessing_for", "statistics_task", "study_task_for"]


def own_task(task: str, study: StudySpec | None) -> TaskSpec:
    """The task this site trains: its study's (own copy), else the registry task."""
    return get_task(task) if study is None else study_task(study)


def statistics_task(task: str, study: StudySpec | None) -> TaskRef:
    """What the statistics phase bins: this site's study's task, else the task's name."""
    if study is None:
        return task
    try:
        return study_task(study)
    except UntrainableStudyError:
        return task  # not trained here: its runs are refused before any release


def preprocessing_for(config: dict[str, Any], *, study: StudySpec, data: SiteData | None,
                      statistics: bool) -> Preprocessing | None:
    """The run's imputation and scaling (composed by the coordinator from its DP
    statistics), checked against this site's spec; None when the run has none.

    Raises:
        TaskError: ``bad-task`` when it does not fit the study, or when the site's rows
            have missing values the study imputes and the run brings no values for
            them (not for the statistics release itself, which comes before them).
    """
    assert data is not None
    text = config.get(CFG.PREPROCESSING)
    if isinstance(text, str):
        try:
            return Preprocessing.from_json(text, study)
        except PreprocessingError as err:
            raise TaskError(SiteErrorCode.BAD_TASK, f"bad-task: {err}") from None
    if statistics:
        return None
    if np.isnan(data.train_x).any() or np.isnan(data.test_x).any():
        raise TaskError(
            SiteErrorCode.BAD_TASK,
            "bad-task: this site's rows have missing values in features the study "
            f"imputes ({', '.join(imputed_features(study))}) and the run brings no "
            "imputation values; they come from the run's statistics phase: the ML team "
            "launches the run with --statistics")
    return None


def study_task_for(config: dict[str, Any], *, study: StudySpec, data: SiteData | None,
                   statistics: bool = False) -> tuple[TaskSpec, SiteData | None]:
    """The model of a run of this site's study, from the site's own copy of the spec,
    with the run's preprocessing (``statistics``: for the statistics release, which
    comes before it); and, when the run imputes, the site's rows with its imputation
    applied (else None).

    Raises:
        TaskError: ``refused-policy`` when the run pins another spec than this copy;
            ``bad-task`` when its preprocessing does not fit or is missing.
    """
    own = study.content_hash()
    pinned = config.get(CFG.STUDY_HASH)
    if pinned != own:
        ref = str(config.get(CFG.STUDY, "")) or str(config.get(CFG.TASK, "?"))
        raise TaskError(
            SiteErrorCode.REFUSED_POLICY,
            f"refused-policy: the run trains study {ref} (sha256 {pinned or 'none'}) but "
            f"this site's data is mapped to study {study.name} (sha256 {own}); the "
            "site's IT approves that version, points site.json's study at it and "
            "checks the mapping (fedward-site mapping check)")
    preprocessing = preprocessing_for(config, study=study, data=data, statistics=statistics)
    try:
        task = study_task(study, preprocessing)
    except UntrainableStudyError as err:
        raise TaskError(SiteErrorCode.BAD_TASK, f"bad-task: {err}") from None
    fill = task.model_params.get("fill")
    rows = None
    if isinstance(fill, list) and data is not None:
        # DP-SGD and the evaluation check their input for NaN: hand them the rows as
        # the model's own imputation step sees them (the same values).
        rows = replace(data, train_x=fill_missing(data.train_x, fill),
                       test_x=fill_missing(data.test_x, fill))
    return task, rows
