"""The level graph: a networkx view over a checked program.

Nodes are the levels, plus `outer` (the training optimizer, the slowest level). Edges say how
knowledge moves between levels:
- `data`: the output of one level is (part of) the input of the next in the model's block;
- `generates`: a level produces another's keys, values, queries or gates (self-modifying Titans);
- `meta_init`: the outer level learns the initial state (`init meta`);
- `nested_init`: the next slower level learns it (`init nested`);
- `pretrained_init`: the initial state is copied from another level;
- `trains`: the outer level updates the level's parameters (projections, gates, weights);
- `task_gradient`: the level is updated in-sequence with the gradient of the model's own loss,
  the signal the outer level also follows (shared gradient flow, CMS levels).

Optimizer levels (state `moment`, SEMANTICS §3 and §8) are nodes too, one per level whose
`update` names them (`LEVEL.NAME`, each with its own state) and one per optimizer level of the
train section's update (`outer.NAME`), at the frequency they step at:
- `gradient`: the gradient stream flows into the optimizer level, from the level it serves (from
  `outer`, the model's parameters, for the outer optimizer's);
- `reads`: an optimizer level's input reads another's state;
- `update`: the update read from the optimizer level flows into the weights it serves.
"""

from __future__ import annotations

import json
from fractions import Fraction

import networkx as nx

from nestc import rules
from nestc.lang import ir
from nestc.lang.queries import block_levels, generated_roles, reachable_levels
from nestc.passes.optimizers import slow_period

OUTER = "outer"


def build(program: ir.Program) -> nx.MultiDiGraph:
    graph = nx.MultiDiGraph(name=program.file)
    train = program.train
    # the outer optimizer written as levels: its updates, labelled by what they step
    outer_updates = [(label, update) for label, update in (("matrix update", train.matrix_update),
                                                           ("update", train.update)) if update is not None]
    graph.add_node(OUTER, kind="outer", state="the model's parameters" + (
                       "" if outer_updates else " and the optimizer's moments"),
                   objective="task", frequency="every step", rate=_outer_rate(train), read="-",
                   optimizer=ir.format_value(train.optimizer) + (
                       " with " + " and ".join(label for label, _ in outer_updates) if outer_updates else ""))
    for level in program.levels:
        in_sequence = level.every.tokens != 0
        graph.add_node(level.name, kind="level", state=ir.format_value(level.state),
                       objective=ir.format_value(level.objective) if level.objective and in_sequence else "-",
                       optimizer=(ir.format_value(level.optimizer) if level.optimizer else "closed form")
                       if in_sequence else "outer only",
                       frequency=_frequency_text(level.every), rate=_rate(level.every, train),
                       read=ir.format_value(level.read) if in_sequence and level.read else "-")
    for level in program.levels:
        for generator, roles in generated_roles(level).items():
            label = ", ".join(sorted(roles))
            if generator == level.name:
                graph.add_edge(generator, level.name, kind="generates", label=f"generates own {label}")
            else:
                graph.add_edge(generator, level.name, kind="generates", label=f"generates {label}")
        init = level.init
        if isinstance(init, ir.Op):
            if init.name == "meta" and level.every.tokens != 0:
                graph.add_edge(OUTER, level.name, kind="meta_init", label="learns initial state")
            elif init.name == "pretrained":
                graph.add_edge(init.arg("source"), level.name, kind="pretrained_init", label="initial state")
        if isinstance(level.objective, ir.Op) and rules.OBJECTIVES[level.objective.name].continuum \
                and level.every.tokens != 0:
            graph.add_edge(OUTER, level.name, kind="task_gradient", label="shares the task gradient")
        graph.add_edge(OUTER, level.name, kind="trains",
                       label="trains" if level.every.steps == 1 else f"trains every {ir.format_value(level.every.steps)} steps")
    for level in program.levels:
        if level.update is not None:
            _optimizer_levels(graph, level.name, [("update", level.update)],
                              lambda moment, served=level: (_frequency_text(served.every), _rate(served.every, train)))
    _optimizer_levels(graph, OUTER, outer_updates, lambda moment: _outer_frequency(moment, train))
    if program.model is not None:
        for block in program.model.blocks():
            _data_edges(graph, block, [])
        graph.graph["layers"] = layer_groups(program)
    for level in program.levels:
        if isinstance(level.init, ir.Op) and level.init.name == "nested":
            slower = _next_slower(graph, level.name)
            if slower is not None:
                graph.add_edge(slower, level.name, kind="nested_init", label="learns initial state")
    return graph


def _optimizer_levels(graph: nx.MultiDiGraph, served: str, updates: list[tuple[str, ir.Update]], frequency) -> None:
    """A node per optimizer level of `served`'s updates (each (its edges' label, Update)), with
    the gradient flowing in, what it reads, and the update flowing out; `frequency(level)` is its
    (text, rate)."""
    for label, update in updates:
        for stepping, moment in enumerate(update.levels):
            node = f"{served}.{moment.name}"
            if node not in graph:
                text, rate = frequency(moment)
                graph.add_node(node, kind="optimizer", state=ir.format_value(moment.state),
                               objective=ir.format_value(moment.objective), optimizer=moment.optimizer.name,
                               frequency=text, rate=rate, read="-", stepping=stepping)
                inputs = [part for part in (moment.key, moment.value) if part is not None]
                read = {n.level for part in inputs for n in ir.walk(part) if isinstance(n, ir.OptimizerRef)}
                if any(isinstance(n, ir.StreamRef) for part in inputs for n in ir.walk(part)):
                    graph.add_edge(served, node, kind="gradient", label="gradient")
                for name in sorted(read):
                    graph.add_edge(f"{served}.{name}", node, kind="reads", label="reads")
        for name in sorted({n.level for n in ir.walk(update.expression) if isinstance(n, ir.OptimizerRef)}):
            graph.add_edge(f"{served}.{name}", served, kind="update", label=label)


def _outer_frequency(moment: ir.Level, train: ir.Train) -> tuple[str, Fraction]:
    """An optimizer level of the outer update moves every step, or every N steps."""
    period = slow_period(moment)
    return ("every step" if period == 1 else f"every {period} steps"), _outer_rate(train) / period


def _data_edges(graph: nx.MultiDiGraph, block: ir.Block, upstream: list[str]) -> list[str]:
    """Add `data` edges along the block; returns the levels whose output leaves the block."""
    if isinstance(block, ir.UseLevel):
        for source in upstream:
            graph.add_edge(source, block.level, kind="data", label="data")
        return [block.level]
    if isinstance(block, ir.MemoryAsContext):
        for source in upstream:
            graph.add_edge(source, block.memory, kind="data", label="data")
            graph.add_edge(source, block.attention, kind="data", label="data")
        graph.add_edge(block.memory, block.attention, kind="data", label="retrieved context")
        graph.add_edge(block.attention, block.memory, kind="data", label="attention output (next segment)")
        return [block.attention, block.memory]
    if isinstance(block, ir.Sequence):
        current = upstream
        for item in block.items:
            produced = _data_edges(graph, item, current)
            current = produced or current
        return current
    # The blocks inside any other block (the options of a choice) read the same input, and all
    # their outputs leave it; a residual's input leaves it too. (The other nodes inside, such as a
    # choice of `combine`, use no level and add nothing.)
    produced = [n for child in block.children() for n in _data_edges(graph, child, upstream)]
    return produced + upstream if isinstance(block, ir.Residual) else produced


def layer_groups(program: ir.Program) -> list[dict]:
    """The model's distinct layer blocks, each with the layers that run it (as text: `0-2, 4`)
    and the levels each of those layers holds a copy of."""
    model = program.model
    levels = {level.name: level for level in program.levels}
    if model.pattern is None:
        layers = f"0-{model.layers - 1}" if isinstance(model.layers, int) and model.layers > 1 else \
            "0" if model.layers == 1 else f"every layer ({ir.format_value(model.layers)})"
        indices = {model.block: layers}
    else:
        positions: dict[ir.Block, list[int]] = {}
        for index, block in enumerate(model.pattern):
            positions.setdefault(block, []).append(index)
        indices = {block: _ranges(found) for block, found in positions.items()}
    groups = []
    for block, layers in indices.items():
        reached = reachable_levels(levels, block_levels(block))
        groups.append({"layers": layers, "block": ir.format_value(block),
                       "levels": [name for name in program.level_names if name in reached]})
    return groups


def _ranges(indices: list[int]) -> str:
    """`0-2, 4` for [0, 1, 2, 4]."""
    runs: list[list[int]] = []
    for index in indices:
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return ", ".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)


def _frequency_text(every: ir.Frequency) -> str:
    if every.tokens == 0:
        return "frozen in-sequence" if every.steps == 1 else f"every {ir.format_value(every.steps)} steps"
    return f"every {ir.format_value(every.tokens)} tokens" if every.tokens != 1 else "every token"


def _outer_rate(train: ir.Train) -> Fraction:
    """Outer updates per token: one per step of batch x context tokens."""
    batch = train.batch if isinstance(train.batch, int) else 1
    context = train.context if isinstance(train.context, int) else 1
    return Fraction(1, batch * context)


def _rate(every: ir.Frequency, train: ir.Train) -> Fraction:
    """Updates per token, the paper's measure of a level's frequency (choices: the fastest option)."""
    tokens = [t for t in (every.tokens.options if isinstance(every.tokens, ir.Choice) else (every.tokens,))]
    steps = [s for s in (every.steps.options if isinstance(every.steps, ir.Choice) else (every.steps,))]
    if all(isinstance(t, int) for t in tokens) and max(tokens) > 0:
        return Fraction(1, min(t for t in tokens if t > 0))
    step = min(s for s in steps if isinstance(s, int)) if any(isinstance(s, int) for s in steps) else 1
    return _outer_rate(train) / step


def frequency_order(graph: nx.MultiDiGraph) -> list[str]:
    """Levels from slowest to fastest; ties broken by dependency (upstream first), then by name."""
    dependency = nx.DiGraph()
    dependency.add_nodes_from(graph.nodes)
    dependency.add_edges_from((s, t) for s, t in graph.edges() if s != t)
    condensed = nx.condensation(dependency)
    position = {}
    for index, component in enumerate(nx.lexicographical_topological_sort(
            condensed, key=lambda c: min(condensed.nodes[c]["members"]))):
        for member in condensed.nodes[component]["members"]:
            position[member] = index
    return sorted(graph.nodes, key=lambda n: (graph.nodes[n]["rate"], position[n], n))


def _next_slower(graph: nx.MultiDiGraph, name: str) -> str | None:
    order = frequency_order(graph)
    index = order.index(name)
    rate = graph.nodes[name]["rate"]
    slower = [n for n in order[:index] if graph.nodes[n]["rate"] < rate and graph.nodes[n]["kind"] == "level"]
    return slower[-1] if slower else OUTER


# --- renderings ----------------------------------------------------------------------------------

def to_text(graph: nx.MultiDiGraph) -> str:
    order = frequency_order(graph)
    width = max(len(n) for n in order)
    lines = [f"level graph of {graph.graph['name']} (slowest first)", ""]
    for name in order:
        node = graph.nodes[name]
        rate = node["rate"]
        lines.append(f"  {name:<{width}}  {node['frequency']:<20} state {node['state']}")
        details = f"optimizer {node['optimizer']}"
        if node["objective"] != "-":
            details = f"objective {node['objective']}, " + details
        if node["read"] != "-":
            details += f", read {node['read']}"
        lines.append(f"  {'':<{width}}  {'':<20} {details}  [{_rate_text(rate)}]")
    optimizers: dict[str, list[str]] = {}
    for name in order:
        if graph.nodes[name]["kind"] == "optimizer":
            optimizers.setdefault(name.rsplit(".", 1)[0], []).append(name)
    if optimizers:
        lines += ["", "optimizer levels (each served level's, fastest first, the slowest last):"]
        for served in (name for name in order if name in optimizers):
            # the same frequency: in the order they step (a level after those it reads)
            ranked = sorted(optimizers[served], key=lambda n: (-graph.nodes[n]["rate"], graph.nodes[n]["stepping"]))
            lines.append(f"  {served}: " + ", ".join(f"{n.rsplit('.', 1)[1]} ({graph.nodes[n]['frequency']})"
                                                     for n in ranked))
    if "layers" in graph.graph:
        lines += ["", "layers:"]
        for group in graph.graph["layers"]:
            lines.append(f"  {group['layers']}: {group['block']}  [levels {', '.join(group['levels'])}]")
    lines += ["", "edges:"]
    grouped: dict[tuple[str, str], list[str]] = {}
    for source, target, data in _sorted_edges(graph):
        grouped.setdefault((source, data["label"]), []).append(target)
    for (source, label), targets in grouped.items():
        lines.append(f"  {source} -> {', '.join(targets)}: {label}")
    return "\n".join(lines) + "\n"


def _rate_text(rate: Fraction) -> str:
    if rate == 0:
        return "0 updates/token"
    if rate.numerator == 1:
        return f"1 update / {rate.denominator} tokens" if rate.denominator != 1 else "1 update/token"
    return f"{float(rate):.3g} updates/token"


def _sorted_edges(graph: nx.MultiDiGraph):
    kinds = ["generates", "data", "meta_init", "nested_init", "pretrained_init", "task_gradient", "trains",
             "gradient", "reads", "update"]
    return sorted(graph.edges(data=True), key=lambda e: (kinds.index(e[2]["kind"]), e[0], e[1], e[2]["label"]))


def _dot_id(name: str) -> str:
    return '"' + name.replace('"', '\\"') + '"'


# How each kind of edge looks: colour, line style, width (both in Graphviz and in matplotlib).
_EDGE_LOOKS = {
    "data": ("black", "solid", 1), "generates": ("firebrick", "solid", 2), "meta_init": ("royalblue", "dashed", 1),
    "nested_init": ("royalblue", "dashed", 1), "pretrained_init": ("#666666", "dashed", 1),
    "task_gradient": ("darkgreen", "dotted", 1), "trains": ("#b3b3b3", "dotted", 1),
    "gradient": ("darkorange", "dashed", 1), "reads": ("darkorange", "solid", 1), "update": ("darkorange", "solid", 2),
}


def _node_label(graph: nx.MultiDiGraph, name: str, newline: str) -> str:
    node = graph.nodes[name]
    return newline.join((name, node["state"], node["frequency"]))


def to_dot(graph: nx.MultiDiGraph) -> str:
    lines = [f"digraph {_dot_id(graph.graph['name'])} {{", "  rankdir=TB;", '  node [shape=box, fontname="Helvetica"];']
    for name in frequency_order(graph):
        shape = ', shape=doubleoctagon' if name == OUTER else ""
        lines.append(f'  {_dot_id(name)} [label="{_node_label(graph, name, chr(92) + "n")}"{shape}];')
    for source, target, data in _sorted_edges(graph):
        color, style, width = _EDGE_LOOKS[data["kind"]]
        look = f'color="{color}"' + (f", style={style}" if style != "solid" else "") + \
            (f", penwidth={width}" if width != 1 else "")
        lines.append(f'  {_dot_id(source)} -> {_dot_id(target)} [label="{data["label"]}", {look}];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def draw_png(graph: nx.MultiDiGraph, path: str) -> None:
    """The level graph drawn with networkx and matplotlib (when Graphviz is not installed): levels in
    rows from the slowest (top) to the fastest, each edge in its kind's look, its labels beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = frequency_order(graph)
    rates = sorted({graph.nodes[name]["rate"] for name in order})
    rows: dict[int, list[str]] = {}
    for name in order:
        rows.setdefault(rates.index(graph.nodes[name]["rate"]), []).append(name)
    width = max(len(row) for row in rows.values())
    # A column as wide as the longest line of a box (at 7 points, about 0.06 inches a character).
    characters = max(len(line) for name in order for line in _node_label(graph, name, "\n").split("\n"))
    column_width = 1.4 * characters  # in data units: a box and the gap to the next
    position = {name: ((column - (len(row) - 1) / 2) * column_width, -row_index * 20.0)
                for row_index, row in rows.items() for column, name in enumerate(row)}
    figure, axis = plt.subplots(figsize=(max(6.0, 0.065 * column_width * width), max(3.0, 1.9 * len(rows))))
    for kind, (color, style, line_width) in _EDGE_LOOKS.items():
        edges = [(s, t) for s, t, data in graph.edges(data=True) if data["kind"] == kind]
        if edges:
            nx.draw_networkx_edges(graph, position, edgelist=edges, ax=axis, edge_color=color, style=style,
                                   width=line_width, arrows=True, arrowsize=12, node_size=2500,
                                   connectionstyle="arc3,rad=0.12")
    labels: dict[tuple[str, str], list[str]] = {}
    for source, target, data in _sorted_edges(graph):
        if source != target:  # a level's own (self-modifying) edge is named in its box instead
            labels.setdefault((source, target), []).append(data["label"])
    nx.draw_networkx_edge_labels(nx.DiGraph(list(labels)), position, ax=axis, font_size=6,
                                 connectionstyle="arc3,rad=0.12",
                                 edge_labels={edge: "; ".join(texts) for edge, texts in labels.items()})
    own = {s: data["label"] for s, t, data in graph.edges(data=True) if s == t}
    nx.draw_networkx_labels(graph, position, ax=axis, font_size=7,
                            labels={name: _node_label(graph, name, "\n") + (f"\n({own[name]})" if name in own else "")
                                    for name in order},
                            bbox={"boxstyle": "round,pad=0.4", "facecolor": "white", "edgecolor": "0.3"})
    axis.set_title(f"level graph of {graph.graph['name']} (slowest first)")
    axis.margins(0.15)
    axis.axis("off")
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def to_mermaid(graph: nx.MultiDiGraph) -> str:
    lines = ["flowchart TB"]
    ids = {name: f"n{index}" for index, name in enumerate(frequency_order(graph))}
    for name, node_id in ids.items():
        node = graph.nodes[name]
        lines.append(f'  {node_id}["{name}<br/>{node["state"]}<br/>{node["frequency"]}"]')
    arrows = {"data": "-->", "generates": "==>", "trains": "-.->", "task_gradient": "-.->"}
    for source, target, data in _sorted_edges(graph):
        lines.append(f'  {ids[source]} {arrows.get(data["kind"], "-.->")}|{data["label"]}| {ids[target]}')
    return "\n".join(lines) + "\n"


def to_json(graph: nx.MultiDiGraph) -> str:
    order = frequency_order(graph)
    nodes = []
    for name in order:
        node = dict(graph.nodes[name])
        rate = node.pop("rate")
        node["updates_per_token"] = str(rate)
        nodes.append({"id": name, **node})
    edges = [{"source": s, "target": t, "kind": d["kind"], "label": d["label"]} for s, t, d in _sorted_edges(graph)]
    layers = {"layers": graph.graph["layers"]} if "layers" in graph.graph else {}
    return json.dumps({"name": graph.graph["name"], "order": order, "nodes": nodes, "edges": edges, **layers},
                      indent=2) + "\n"
