"""The records of a search (MLflow runs, tags, params, files) and the rule that ranks its trials."""

from melora_tune.records.schema import (  # noqa: F401
    CHECKPOINT_TAG, DEFAULT_STORAGE_PATH, DEFAULT_TRACKING_URI, KIND_TAG, META_NAME, OPTUNA_TAG, PARENT_TAG, REASON_TAG,
    SCORED, SEARCH_KIND, SEARCH_TAG, STATUS_TAG, TRIAL_STATUSES, TRIAL_TAG, finite, is_scored, rank_key,
)
