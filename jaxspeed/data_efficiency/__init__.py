"""Data efficiency: curriculum schedules, seqlen warm-up, offline analysis, curriculum sampling.

After DeepSpeed's curriculum learning (arXiv 2108.06084) and Data Efficiency
library (arXiv 2212.03597).
"""

from jaxspeed.data_efficiency.analyzer import (
    BUILTIN_METRICS,
    AnalysisIndex,
    analyze,
    seqlen,
    token_neg_log_probs,
    vocab_rarity,
)
from jaxspeed.data_efficiency.curriculum import SCHEDULE_TYPES, CurriculumSchedule
from jaxspeed.data_efficiency.sampler import DIFFICULTY_TYPES, CurriculumSampler, MetricCurriculum
from jaxspeed.data_efficiency.seqlen import (
    SEQLEN_MODES,
    apply_seqlen,
    reshape_batch,
    truncate_batch,
)

__all__ = [
    "BUILTIN_METRICS",
    "DIFFICULTY_TYPES",
    "SCHEDULE_TYPES",
    "SEQLEN_MODES",
    "AnalysisIndex",
    "CurriculumSampler",
    "CurriculumSchedule",
    "MetricCurriculum",
    "analyze",
    "apply_seqlen",
    "reshape_batch",
    "seqlen",
    "token_neg_log_probs",
    "truncate_batch",
    "vocab_rarity",
]
