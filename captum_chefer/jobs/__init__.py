"""Dataset jobs: run attribution methods over a whole dataset, store, resume, evaluate, report.

- :func:`run_job` explains every example with each method (ours and Captum's), scores the
  attributions with ``captum_chefer.metrics``, and stores per-example results in safetensors
  shards with a JSON index; rerunning resumes; under ``torchrun`` the ranks share the work.
- :class:`JobResults` loads the results back lazily, one example at a time, and warns
  (:class:`IncompleteResultsWarning`) naming any shard missing or failing verification.
- The command line is ``captum-chefer-job`` (or ``python -m captum_chefer.jobs``).
"""

from .data import Batch, TensorSource, TextSource, open_source
from .methods import Method
from .models import JobModel, PrototypeClassifier, build_model, minilm_sentiment
from .runner import JobSettings, JobSummary, run_job
from .store import Example, IncompleteResultsWarning, JobResults

__all__ = [
    "Batch",
    "Example",
    "IncompleteResultsWarning",
    "JobModel",
    "JobResults",
    "JobSettings",
    "JobSummary",
    "Method",
    "PrototypeClassifier",
    "TensorSource",
    "TextSource",
    "build_model",
    "minilm_sentiment",
    "open_source",
    "run_job",
]
