"""Hypothesis strategies for planner tests: small random placement instances."""

from __future__ import annotations

from hypothesis import strategies as st

from butterfly.types import LayerInfo, Link, NodeCapability, Topology


@st.composite
def instances(
    draw: st.DrawFn, max_layers: int, min_nodes: int, max_nodes: int
) -> tuple[list[LayerInfo], list[NodeCapability], Topology]:
    n_layers = draw(st.integers(1, max_layers))
    n_nodes = draw(st.integers(min_nodes, max_nodes))
    layers = [
        LayerInfo(
            i,
            draw(st.floats(0.5, 20)),
            draw(st.integers(1, 50)),
            draw(st.integers(0, 4_000_000)),
        )
        for i in range(n_layers)
    ]
    nodes = [
        NodeCapability(f"n{a}", draw(st.floats(0.2, 4)), draw(st.integers(10, 200)))
        for a in range(n_nodes)
    ]
    links = tuple(
        (f"n{a}", f"n{b}", Link(draw(st.floats(1e7, 1e10)), draw(st.floats(0, 0.005))))
        for a in range(n_nodes)
        for b in range(n_nodes)
        if a != b and draw(st.booleans())
    )
    return layers, nodes, Topology(links=links)
