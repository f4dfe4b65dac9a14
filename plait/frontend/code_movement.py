"""Code movement: constant text ahead of variable text, so more of each prompt is shared.

The SGLang paper names this compiler pass and warns that it may change the program's prompt:
it is not semantics-preserving, so ``Function.compile(code_movement=True)`` is opt-in.

The rule, per stream of the graph (``plait.frontend.graph``):

- A *region* is a maximal run of text nodes: constants, arguments and variable references.
  Everything else is a barrier that never moves and that no text crosses: ``gen``,
  ``select``, role begin/end (text stays in its chat message), ``var_scope`` bounds, fork,
  join, ``separate_reasoning``.
- Within a region the text is cut into lines (after each ``\\n``). A line holding an argument
  or a variable reference is *variable*; a line of constants only is *constant*.
- Constant lines move ahead of variable lines; each group keeps its order. The region's last
  line, when it does not end in ``\\n``, stays last: it is the cue a following ``gen`` reads
  (``"Answer:"``), and moving it would detach it from the generation.

So a few-shot prompt written question-first, ``"Question: " + q + "\\n\\n" + examples +
"Answer:"``, runs as ``"\\n" + examples + "Question: " + q + "\\n" + "Answer:"``: every
instance of the program now shares the examples as a prefix in the radix cache.
"""

from __future__ import annotations

import re

from plait.frontend import ir
from plait.frontend.graph import ProgramGraph


def move_constants_first(graph: ProgramGraph) -> ProgramGraph:
    """A new graph whose regions have their constant lines first (see the module doc). Each
    reordered region is placed where its last node was, so a variable reference is never
    issued before the node that writes it."""
    regions: dict[int, list[int]] = {}  # index of a region's last node -> its node indices
    open_region: dict[int, list[int]] = {}  # stream -> indices of the region being read
    for i, (sid, node) in enumerate(graph.order):
        if isinstance(node, (ir.Constant, ir.Argument)):
            open_region.setdefault(sid, []).append(i)
            continue
        region = open_region.pop(sid, None)
        if region:
            regions[region[-1]] = region
    for region in open_region.values():
        regions[region[-1]] = region
    in_region = {i for r in regions.values() for i in r}
    order: list[tuple[int, ir.Expr]] = []
    for i, (sid, node) in enumerate(graph.order):
        if i in regions:
            order.extend((sid, n) for n in reorder([graph.order[j][1] for j in regions[i]]))
        elif i not in in_region:
            order.append((sid, node))
    return ProgramGraph(arg_names=graph.arg_names, streams=graph.streams, order=order)


def reorder(nodes: list[ir.Expr]) -> list[ir.Expr]:
    """One region's text nodes with its constant lines first (the cue line stays last)."""
    lines = _lines(nodes)
    cue: list[ir.Expr] = []
    if lines and not _ends_line(lines[-1]):
        cue = lines.pop()
    constant = [line for line in lines if all(isinstance(n, ir.Constant) for n in line)]
    variable = [line for line in lines if not all(isinstance(n, ir.Constant) for n in line)]
    return [n for line in constant + variable for n in line] + cue


def _lines(nodes: list[ir.Expr]) -> list[list[ir.Expr]]:
    """The region cut after every newline; a constant spanning lines is split there."""
    lines: list[list[ir.Expr]] = [[]]
    for node in nodes:
        if not isinstance(node, ir.Constant):
            lines[-1].append(node)
            continue
        for piece in re.findall(r"[^\n]*\n|[^\n]+", node.value):
            lines[-1].append(ir.Constant(piece))
            if piece.endswith("\n"):
                lines.append([])
    return [line for line in lines if line]


def _ends_line(line: list[ir.Expr]) -> bool:
    last = line[-1]
    return isinstance(last, ir.Constant) and last.value.endswith("\n")
