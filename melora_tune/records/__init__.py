"""The records of a search (MLflow runs, tags, params, files) and the rule that ranks its trials."""

from melora_tune.records.schema import (  # noqa: F401
    BASELINE_LABELS, BASELINES, CHECKPOINT_TAG, CONFIG_TAG, CONFIRM_DIR, CONFIRM_KIND, CONFIRMS_TAG, CONFIRMS_TRIAL_TAG,
    DEFAULT_STORAGE_PATH, DEFAULT_TRACKING_URI, KIND_TAG, META_NAME, OPTUNA_TAG, PARENT_TAG, REASON_TAG, SCORED,
    SEARCH_KIND, SEARCH_TAG, SEED_TAG, STATUS_TAG, TRIAL_STATUSES, TRIAL_TAG, baseline_metric, finite, is_scored,
    rank_key, VAL_SCORE, TEST_SCORE, SEED_PARAM, MAJORITY_SHARE, SCORE_METRIC_PARAM,
)
