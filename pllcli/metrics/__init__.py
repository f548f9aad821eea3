"""Evaluation metrics (numpy only), one module per family in the sed_scores_eval style.

- `single_label`: accuracy, top-k, F1 (macro / micro), per-class precision / recall,
  confusion matrix, expected calibration error.
- `multi_label`: average precision / mAP (macro, micro), lwlrap (DCASE 2019 task 2),
  ROC AUC, d-prime.
- `segment_based`, `event_based`: sed_eval segment-based and event-based (collar) F1 (equal to
  sed_scores_eval's on the same events, tests/test_sed.py); `frame_based`: frame-level AUC and F1.
- `sed` (optional extra `sed`, imported on demand): PSDS1 / PSDS2, collar, segment and
  intersection F1 computed by sed_scores_eval.
- `pll`: disambiguation accuracy and candidate-set coverage.

Conventions shared by every module:
- scores are (N, C) float arrays, targets are (N,) int class indices (single-label) or
  (N, C) {0, 1} arrays (multi-label);
- class-wise functions return a float array (C,) with NaN where the metric is undefined
  (a class without positives); macro averages skip those classes (documented per function);
- F-score functions return `(f, p, r, stats)` dicts keyed by class name plus
  `"macro_average"` and `"micro_average"`, like sed_scores_eval.
"""
from pllcli.metrics import event_based, frame_based, multi_label, pll, segment_based, single_label
from pllcli.metrics.multi_label import (average_precision, d_prime, lwlrap, mean_average_precision,
                                        roc_auc)
from pllcli.metrics.pll import candidate_coverage, disambiguation_accuracy
from pllcli.metrics.single_label import (accuracy, confusion_matrix, expected_calibration_error,
                                         f1_scores, precision_recall_per_class, top_k_accuracy)

__all__ = [
    "single_label", "multi_label", "segment_based", "event_based", "frame_based", "pll",
    "accuracy", "top_k_accuracy", "f1_scores", "precision_recall_per_class", "confusion_matrix",
    "expected_calibration_error", "average_precision", "mean_average_precision", "lwlrap",
    "roc_auc", "d_prime", "disambiguation_accuracy", "candidate_coverage",
]
