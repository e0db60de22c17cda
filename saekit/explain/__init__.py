"""Auto-interpretation: explain a feature store's latents with any LLM, score the explanations (detection, fuzzing;
lexical without an LLM) against a token-profile baseline and shuffled explanations, resumably (see batch.py)."""

from .batch import RESULTS, Results, dry_run, format_report, needs_llm, parse_features, report, run
from .client import HttpClient, LLMClient, LocalClient, Reply, make_client

__all__ = ["RESULTS", "HttpClient", "LLMClient", "LocalClient", "Reply", "Results", "dry_run", "format_report",
           "make_client", "needs_llm", "parse_features", "report", "run"]
