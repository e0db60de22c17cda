"""Attribution graphs: a prompt's computation traced through transcoder features (Ameisen et al. 2025).

The *local replacement model* of a prompt: every MLP replaced by its layer's transcoder, the transcoder's error
(MLP output − transcoder output) added back at each layer and position as a fixed *error node*, attention
patterns and normalisation denominators frozen from the clean forward. With the error nodes in, its logits are
the model's. Inside it the residual stream is linear in the feature activations, the error nodes and the token
embeddings, so the direct effect of a source on a target is exact: the source's value × its write vector · the
target's gradient at that layer and position. The gradients come from an explicit backward through the frozen
layers (norm, attention's OV path), a batch of targets at a time: no autograd through the model, and no MLP.

Targets: a feature's pre-activation (its encoder input), or a logit minus the mean logit (the logits carrying
most of the probability, a chosen token, or a contrast "A-B"). Position 0 (BOS, the attention sink, which the
transcoders never saw in training) holds no feature or error node: its MLP output is a constant there, as
circuit-tracer zeroes it.

    graph = attribute(model, transcoders, "The capital of France is")
    graph.prune(0.8, 0.98); graph.scores(); validate(model, transcoders, graph)
"""

from ..config import AttributionConfig
from .build import LogitTarget, attribute, logit_targets
from .graph import Graph, Pruned
from .graph_json import read_graph_json, write_graph_json
from .replacement import FrozenAttention, FrozenNorm, LocalReplacement
from .report import attribute_to_dir, attribution_report
from .validate import edit_features, target_value, validate

__all__ = ["AttributionConfig", "FrozenAttention", "FrozenNorm", "Graph", "LocalReplacement", "LogitTarget",
           "Pruned", "attribute", "attribute_to_dir", "attribution_report", "edit_features", "logit_targets",
           "read_graph_json", "target_value", "validate", "write_graph_json"]
