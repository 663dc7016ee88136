"""Pure, jittable post-hoc methods over logits and parameter pytrees.

    from glajax import methods as M
    log_prior = M.estimate_log_prior(zs_logits, labels)
    logits = M.gla_ensemble(ft_logits, zs_logits, log_prior)
    interval = M.bootstrap(key, M.accuracy_of, M.row_summaries(logits, labels))
"""
from glajax.methods.absent import (alg_gamma, apply_gamma, ausuc, oracle_gamma, pcv_gamma,
                                   seen_absent_accuracies)
from glajax.methods.uncertainty import (Interval, accuracy_of, bootstrap, class_mean_accuracy_of,
                                        ece_of, row_summaries, subset_accuracy_of)
from glajax.methods.adjust import (backdoor_ensemble, gla_ensemble, logit_adjust,
                                   logit_adjusted_loss)
from glajax.methods.calibrate import (adaptive_ece, brier, classwise_ece, ece, fit_temperature,
                                      mce, nll, reliability_diagram)
from glajax.methods.ensemble import output_ensemble, wise_ft
from glajax.methods.metrics import (accuracy, average_shift_accuracy, count_groups,
                                    effective_robustness, prior_groups,
                                    group_accuracy, group_accuracy_by_prior, objectnet_logits,
                                    per_class_accuracy, restrict_logits)
from glajax.methods.priors import (estimate_log_prior, match_confidence_temperature,
                                   normalise_log_prior, optimality_residual)

__all__ = [
    "estimate_log_prior", "match_confidence_temperature", "normalise_log_prior",
    "optimality_residual", "logit_adjust", "logit_adjusted_loss", "gla_ensemble",
    "backdoor_ensemble", "wise_ft", "output_ensemble", "fit_temperature", "ece", "mce",
    "adaptive_ece", "classwise_ece", "nll", "brier", "reliability_diagram", "apply_gamma",
    "alg_gamma", "pcv_gamma", "oracle_gamma", "ausuc", "seen_absent_accuracies", "accuracy",
    "per_class_accuracy", "group_accuracy", "group_accuracy_by_prior", "restrict_logits",
    "objectnet_logits", "average_shift_accuracy", "effective_robustness", "Interval",
    "bootstrap", "row_summaries", "accuracy_of", "ece_of", "class_mean_accuracy_of",
    "subset_accuracy_of", "count_groups", "prior_groups",
]
