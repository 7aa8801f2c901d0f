"""The seeded train/validation/test splits of a task's rows.

Split policy (the same for every source, so results are comparable):

* Data without a validation split (the built-in corpora, a single local file) is
  cut into train/validation/test by ``validation_fraction``/``test_fraction`` of
  all rows, stratified by label for classification.
* Data with its own validation split (GLUE, a local train/validation file pair)
  keeps it as ``validation`` -- so numbers compare with papers that report GLUE
  dev -- and ``test_fraction`` of the training rows becomes ``test``: a held-out
  set the search never looks at, to score its winner without the optimism of
  picking the best of many trials on the same validation rows. Set
  ``test_fraction=0`` to train on all of GLUE's training rows (no ``test`` split).
* ``max_train_samples``/``max_eval_samples`` then draw a seeded, stratified
  subsample (not the head of the file, which is often sorted by label or source).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from melora_tune.errors import UsageError

from .spec import TaskSpec

if TYPE_CHECKING:
    import datasets


def split_rows(
    full: datasets.Dataset, validation: datasets.Dataset | None, spec: TaskSpec, *, stratify: bool, name: str
) -> dict[str, datasets.Dataset | None]:
    """``train``, ``validation`` and ``test`` of ``full`` as this module's split policy says (``test`` is None
    when ``test_fraction`` is 0; ``validation`` is the given one when there is one), then subsampled to
    ``max_train_samples``/``max_eval_samples``. Stratified by the ``label`` column when ``stratify``;
    ``name`` is the task's, for error messages.
    """
    # One generator per step, so a step's draw never depends on whether an earlier
    # optional step ran: validation/test rows stay the same whatever
    # max_train_samples is (trials at different data budgets are scored alike).
    def rng(step: int) -> np.random.Generator:
        return np.random.default_rng([spec.seed, step])

    n = len(full)
    n_test = round(n * spec.test_fraction)
    n_val = 0 if validation is not None else round(n * spec.validation_fraction)
    if validation is None and spec.validation_fraction == 0:
        raise UsageError(f"task {name!r} has no validation split: set validation_fraction > 0 or give validation_path")
    if (spec.test_fraction > 0 and n_test < 1) or (validation is None and n_val < 1) or n - n_test - n_val < 1:
        raise UsageError(
            f"task {name!r} has {n} rows: too few to split off validation_fraction={spec.validation_fraction} "
            f"and test_fraction={spec.test_fraction}"
        )
    if validation is not None and len(validation) == 0:
        raise UsageError(f"task {name!r}: the validation data has no rows")
    train, test = take_rows(full, n_test, rng(0), stratify)
    if validation is None:
        train, validation = take_rows(train, n_val, rng(1), stratify)
    if spec.max_train_samples is not None and spec.max_train_samples < len(train):
        train = take_rows(train, spec.max_train_samples, rng(2), stratify)[1]
    if spec.max_eval_samples is not None:
        if spec.max_eval_samples < len(validation):
            validation = take_rows(validation, spec.max_eval_samples, rng(3), stratify)[1]
        if test is not None and spec.max_eval_samples < len(test):
            test = take_rows(test, spec.max_eval_samples, rng(4), stratify)[1]
    return {"train": train, "validation": validation, "test": test}


def take_rows(
    rows: datasets.Dataset, k: int, rng: np.random.Generator, stratify: bool
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Seeded draw of ``k`` rows: (the rest, the k rows), both in their original order.

    Stratified by hand (largest-remainder quota per class, then a random pick inside
    each class) because ``datasets``' own stratified split reads the label column
    row by row (~2 s for 12k rows) and scikit-learn's costs ~1 s to import.
    """
    if k <= 0:
        return rows, None
    n = len(rows)
    if stratify:
        labels = rows.select_columns(["label"]).with_format("numpy")[:]["label"]
        classes, counts = np.unique(labels, return_counts=True)
        exact = k * counts / n
        quota = np.floor(exact).astype(int)
        # Hand the rows left over to the classes with the largest remainders (ties: lower class id).
        extra = np.argsort(-(exact - quota), kind="stable")[: k - int(quota.sum())]
        quota[extra] += 1
        picked = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
        taken = np.sort(np.concatenate(picked))
    else:
        taken = np.sort(rng.permutation(n)[:k])
    mask = np.ones(n, dtype=bool)
    mask[taken] = False
    return rows.select(np.flatnonzero(mask)), rows.select(taken)
