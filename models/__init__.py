"""Reference workloads on real data: model builder, data split, recipe and metric.

- ``digits-cnn``: small CNN on scikit-learn's 8x8 digits; metric accuracy (%).
- ``tiny-lm``: byte-level decoder-only transformer on the text of Python's
  ``pydoc_data.topics``; metric perplexity.
- ``minilm``: the pretrained all-MiniLM-L6-v2 sentence encoder, distilled
  toward its own fp32 embeddings; metric cosine similarity to fp32.

Nothing is downloaded: every dataset and weight file comes from installed packages.
"""

from models._registry import Workload, WorkloadData, get_workload, list_workloads

__all__ = ["Workload", "WorkloadData", "get_workload", "list_workloads"]
