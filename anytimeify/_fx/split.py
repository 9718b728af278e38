"""Sequential split of a traced graph at stage boundaries into segments run one after another.

Segment k holds every node from the previous boundary up to and including exit k. Each segment
is a GraphModule that shares the converted model's modules (it registers none of its own names in
the converted model). Values that cross a boundary are passed by name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import torch.fx as fx
import torch.nn as nn

from .trace import ReplayTracer

__all__ = ["Segment", "split_graph"]


@dataclass
class Segment:
    """One piece of the split graph.

    Attributes:
        index: position of the segment (0-based).
        module: the GraphModule running it.
        inputs: names of the values it reads (placeholders of the original graph or outputs of
            earlier segments), in the order ``module`` takes them.
        outputs: names of the values it produces for later segments or as results.
    """

    index: int
    module: fx.GraphModule
    inputs: List[str] = field(default_factory=list)
    outputs: List[str] = field(default_factory=list)


def split_graph(root: nn.Module, graph: fx.Graph, segment_of: Dict[fx.Node, int],
                results: Sequence[fx.Node]) -> List[Segment]:
    """Split ``graph`` into segments by ``segment_of`` (every node but placeholders and the output).

    Args:
        root: the module owning the graph's modules and attributes.
        graph: the graph to split; its node order must be a valid execution order.
        segment_of: segment index per node; it must not decrease along the node order.
        results: nodes whose values the caller reads after the segment that makes them.
    """
    n_segments = max(segment_of.values()) + 1
    # unpickling re-traces each segment's code with the graph's tracer class: ReplayTracer keeps
    # the free functions the segments call single nodes, as they are here
    graphs = [fx.Graph(tracer_cls=ReplayTracer) for _ in range(n_segments)]
    envs: List[Dict[fx.Node, fx.Node]] = [{} for _ in range(n_segments)]
    inputs: List[List[str]] = [[] for _ in range(n_segments)]
    producer: Dict[fx.Node, int] = {}
    needed_later: Dict[fx.Node, bool] = {node: False for node in graph.nodes}
    for node in results:
        needed_later[node] = True

    last_seen = -1
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            if node.op == "placeholder":
                producer[node] = -1
            continue
        seg = segment_of[node]
        if seg < last_seen:
            raise AssertionError(f"segment index decreases at node {node.name}")
        last_seen = seg
        env = envs[seg]

        def lookup(arg: fx.Node, seg: int = seg, env: Dict[fx.Node, fx.Node] = env) -> fx.Node:
            if arg in env:
                return env[arg]
            if arg.op == "get_attr":
                env[arg] = graphs[seg].get_attr(arg.target)
                return env[arg]
            if producer.get(arg, seg) < seg:
                needed_later[arg] = True
                env[arg] = graphs[seg].placeholder(arg.name)
                inputs[seg].append(arg.name)
                return env[arg]
            raise AssertionError(f"node {arg.name} is used before it is made")

        if node.op == "get_attr":
            continue  # copied into each segment that reads it
        env[node] = graphs[seg].node_copy(node, lookup)
        producer[node] = seg

    segments = []
    for seg in range(n_segments):
        outs = [node for node in envs[seg] if needed_later.get(node) and producer.get(node) == seg]
        graphs[seg].output(tuple(envs[seg][node] for node in outs))
        module = fx.GraphModule(root, graphs[seg], f"Segment{seg}")
        segments.append(Segment(seg, module, inputs[seg], [node.name for node in outs]))
    return segments
