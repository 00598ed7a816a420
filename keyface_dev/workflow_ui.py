"""UI workflows built the way ComfyUI's frontend (1.32.9) builds nodes, from the host's `object_info`.

A workflow is declared once (`Graph`: nodes with their inputs, the group each belongs to, an optional
lane hint, a note). From it come the API prompt (what `app.graphToPrompt` must give back) and the UI
workflow: every node's input slots, widget order and outputs derived from `object_info`, links that
point at existing slots, and a left-to-right layout along the data flow in titled groups. The rules
below were read off the real frontend (tests/test_frontend.py checks them against fresh nodes):

- input slots: every socket input (required, then optional, in `input_order`), then one slot per
  widget input (`widget: {name}`), then the image-upload slot;
- widgets: each widget input in `input_order`; a `control_after_generate` combo right after an input
  that asks for one; an `upload` button last for an `image_upload` combo;
- body height: 20 px per slot row (max of socket inputs and outputs) + 24 px per widget + 14 px.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
SLOT_H, WIDGET_H, BODY_PAD, TITLE_H = 20, 24, 14, 30
OPTIONAL_SHAPE = 7          # litegraph RenderShape.HollowCircle: how the frontend marks optional sockets
CONTROL_DEFAULT = "fixed"   # reproducible: a shared workflow should not re-roll a seed on each run


# ------------------------------------------------------------------------------------ object_info

def node_info(class_type: str) -> dict:
    """What GET /object_info says about one node class (the same code path as ComfyUI's server.py)."""
    import nodes
    from comfy_api.internal import _ComfyNodeInternal
    cls = nodes.NODE_CLASS_MAPPINGS[class_type]
    if issubclass(cls, _ComfyNodeInternal):
        return json.loads(json.dumps(cls.GET_NODE_INFO_V1()))
    spec = cls.INPUT_TYPES()
    info = {"input": spec, "input_order": {k: list(v) for k, v in spec.items()}, "output": list(cls.RETURN_TYPES),
            "output_name": list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES), "name": class_type,
            "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(class_type, class_type),
            "output_node": bool(getattr(cls, "OUTPUT_NODE", False))}
    return json.loads(json.dumps(info))


@dataclass(frozen=True)
class Slot:
    name: str
    type: str
    optional: bool
    widget: bool


@dataclass(frozen=True)
class NodeDef:
    """A node as the frontend builds it: input slots, widgets (name, default), outputs (name, type)."""

    class_type: str
    slots: tuple[Slot, ...]
    widgets: tuple[tuple[str, object], ...]
    outputs: tuple[tuple[str, str], ...]

    @property
    def sockets(self) -> tuple[Slot, ...]:
        return tuple(s for s in self.slots if not s.widget)

    def output_index(self, name_or_index) -> int:
        if isinstance(name_or_index, int):
            return name_or_index
        names = [n for n, _ in self.outputs]
        types = [t for _, t in self.outputs]
        if name_or_index in names:
            return names.index(name_or_index)
        if types.count(name_or_index) == 1:
            return types.index(name_or_index)
        raise KeyError(f"{self.class_type} has no output {name_or_index!r} (outputs: {self.outputs})")

    def body_height(self) -> int:
        rows = max(len(self.sockets), len(self.outputs))
        return rows * SLOT_H + len(self.widgets) * WIDGET_H + BODY_PAD


def node_def(info: dict) -> NodeDef:
    """Slots, widgets and outputs of a node from its object_info entry, in the frontend's order."""
    sockets, widget_slots, widgets, upload = [], [], [], False
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        for name in info.get("input_order", {}).get(section, list(specs)):
            spec = specs[name]
            kind = spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            combo = isinstance(kind, list) or kind == "COMBO"
            if (combo or kind in WIDGET_TYPES) and not options.get("forceInput"):
                widget_slots.append(Slot(name, "COMBO" if combo else kind, section == "optional", True))
                choices = kind if isinstance(kind, list) else options.get("options", [])
                default = options.get("default", choices[0] if combo and choices else None)
                widgets.append((name, default))
                if options.get("control_after_generate"):
                    widgets.append(("control_after_generate", CONTROL_DEFAULT))
                if options.get("image_upload"):
                    upload = True
            else:
                sockets.append(Slot(name, kind, section == "optional", False))
    if upload:
        widget_slots.append(Slot("upload", "IMAGEUPLOAD", False, True))
        widgets.append(("upload", "image"))
    outputs = tuple(zip(info.get("output_name") or info["output"], info["output"]))
    return NodeDef(info["name"], tuple(sockets + widget_slots), tuple(widgets), outputs)


# ------------------------------------------------------------------------------------ declaring graphs

@dataclass(frozen=True)
class Out:
    """A link source: output `output` (name, type or index) of node `node`."""

    node: str
    output: object = 0


@dataclass
class Node:
    class_type: str
    group: str
    inputs: dict = field(default_factory=dict)
    title: str | None = None
    lane: int = 0              # 0: the data-flow chain; -1: above it (model, prompt, key); 1: below it


@dataclass
class Graph:
    """One shipped workflow: file name (the title the Templates dialog shows), groups left to right, nodes."""

    file: str
    groups: tuple[tuple[str, str], ...]      # (title, colour), left to right
    note: str
    nodes: dict[str, Node]

    def ids(self) -> dict[str, int]:
        return {key: i + 1 for i, key in enumerate(self.nodes)}


def api_prompt(graph: Graph, defs: dict[str, NodeDef]) -> dict:
    """The API-format prompt: what app.graphToPrompt gives for the UI workflow."""
    ids = graph.ids()
    prompt = {}
    for key, node in graph.nodes.items():
        definition = defs[node.class_type]
        inputs = {}
        for name, value in node.inputs.items():
            if isinstance(value, Out):
                source = graph.nodes[value.node]
                inputs[name] = [str(ids[value.node]), defs[source.class_type].output_index(value.output)]
            else:
                inputs[name] = value
        for name, default in definition.widgets:   # graphToPrompt sends every widget, defaults included
            if name not in ("control_after_generate", "upload") and name not in inputs:
                inputs[name] = default
        unknown = set(node.inputs) - {s.name for s in definition.slots}
        if unknown:
            raise KeyError(f"{node.class_type} has no input(s) {sorted(unknown)}")
        prompt[str(ids[key])] = {"inputs": inputs, "class_type": node.class_type,
                                 "_meta": {"title": node.title or display_names.get(node.class_type, node.class_type)}}
    return prompt


display_names: dict[str, str] = {}


# ------------------------------------------------------------------------------------ layout

COLUMN_W, NODE_W, NOTE_W = 410, 320, 330
LANE_GAP, GROUP_PAD, GROUP_TITLE = 50, 20, 46
ORIGIN = (0, 0)
VIEW_OFFSET = (80, 150)   # stored view: right of the side bar, below the menu and the floating Run panel
PREVIEW_H = 200           # room for the image preview of an image loader


def node_size(node: Node, definition: NodeDef) -> tuple[int, int]:
    height = definition.body_height()
    if any(name == "upload" for name, _ in definition.widgets):
        height += PREVIEW_H
    if node.class_type == "CLIPTextEncode":
        height += 60          # the multiline text box is taller than a one-line widget
    return NODE_W, height


def ranks(graph: Graph) -> dict[str, int]:
    """Column of each node: longest path from the sources, then every node off the chain pulled right to
    just before its first consumer, so side inputs (model, key, prompt) sit next to where they are used."""
    parents = {k: [v.node for v in n.inputs.values() if isinstance(v, Out)] for k, n in graph.nodes.items()}
    children = {k: [c for c, ps in parents.items() if k in ps] for k in graph.nodes}
    rank: dict[str, int] = {}

    def depth(key):
        if key not in rank:
            rank[key] = 1 + max((depth(p) for p in parents[key]), default=-1)
        return rank[key]

    for key in graph.nodes:
        depth(key)
    for key in reversed(_topological(graph.nodes, parents)):
        node = graph.nodes[key]
        if node.lane != 0 and children[key]:
            rank[key] = max(min(rank[c] for c in children[key]) - 1, 1 + max((rank[p] for p in parents[key]), default=-1))
    return rank


def _topological(nodes, parents) -> list[str]:
    order, seen = [], set()

    def visit(key):
        if key in seen:
            return
        seen.add(key)
        for p in parents[key]:
            visit(p)
        order.append(key)

    for key in nodes:
        visit(key)
    return order


@dataclass
class Layout:
    pos: dict[str, tuple[int, int]]              # node key -> top-left of the body (title bar above it)
    size: dict[str, tuple[int, int]]
    groups: list[tuple[str, str, tuple[int, int, int, int]]]
    note: tuple[int, int, int, int]


def layout(graph: Graph, defs: dict[str, NodeDef]) -> Layout:
    rank = ranks(graph)
    # Groups keep their declared order left to right: a group starts after the previous one ends.
    order = [g for g, _ in graph.groups]
    column: dict[str, int] = {}
    next_free = 0
    for group in order:
        members = [k for k, n in graph.nodes.items() if n.group == group]
        if not members:
            continue
        shift = max(0, next_free - min(rank[k] for k in members))
        for k in members:
            column[k] = rank[k] + shift
        next_free = max(column[k] for k in members) + 1
    size = {k: node_size(n, defs[n.class_type]) for k, n in graph.nodes.items()}
    # Lane heights: the tallest node of each lane, so lanes never overlap.
    lane_h = {}
    for k, n in graph.nodes.items():
        per_column = {}
        lane_h[n.lane] = max(lane_h.get(n.lane, 0), size[k][1] + TITLE_H)
    # Stack nodes that share a column and lane (rare) below each other.
    stacks: dict[tuple[int, int], list[str]] = {}
    for k, n in graph.nodes.items():
        stacks.setdefault((column[k], n.lane), []).append(k)
    for (col, lane), keys in stacks.items():
        lane_h[lane] = max(lane_h[lane], sum(size[k][1] + TITLE_H for k in keys) + LANE_GAP // 2 * (len(keys) - 1))
    lanes = sorted(lane_h)
    top = {}
    y = ORIGIN[1] + GROUP_TITLE + TITLE_H
    for lane in lanes:
        top[lane] = y
        y += lane_h[lane] + LANE_GAP
    x0 = ORIGIN[0] + NOTE_W + 2 * GROUP_PAD + 40
    pos = {}
    for (col, lane), keys in stacks.items():
        yy = top[lane]
        for k in keys:
            # Slight left shift in the chain lane and right shift in side lanes keeps wires off the bodies.
            pos[k] = (x0 + col * COLUMN_W + GROUP_PAD, yy)
            yy += size[k][1] + TITLE_H + LANE_GAP // 2
    groups = []
    for group, colour in graph.groups:
        members = [k for k, n in graph.nodes.items() if n.group == group]
        if not members:
            continue
        left = min(pos[k][0] for k in members) - GROUP_PAD
        right = max(pos[k][0] + size[k][0] for k in members) + GROUP_PAD
        top_y = min(pos[k][1] for k in members) - TITLE_H - GROUP_TITLE
        bottom = max(pos[k][1] + size[k][1] for k in members) + GROUP_PAD
        groups.append((group, colour, (left, top_y, right - left, bottom - top_y)))
    # Groups share one top and bottom edge, so the graph reads as one band.
    band_top = min(b[1] for _, _, b in groups)
    band_bottom = max(b[1] + b[3] for _, _, b in groups)
    groups = [(g, c, (b[0], band_top, b[2], band_bottom - band_top)) for g, c, b in groups]
    note = (ORIGIN[0], band_top + TITLE_H, NOTE_W, band_bottom - band_top - TITLE_H)
    return Layout(pos, size, groups, note)


# ------------------------------------------------------------------------------------ UI workflow

def ui_workflow(graph: Graph, defs: dict[str, NodeDef], frontend_version: str) -> dict:
    ids = graph.ids()
    geo = layout(graph, defs)
    links, out_links = [], {}
    ui_nodes = []
    for order, (key, node) in enumerate(graph.nodes.items()):
        definition = defs[node.class_type]
        inputs = []
        for index, slot in enumerate(definition.slots):
            entry = {"name": slot.name, "type": slot.type, "link": None}
            if slot.widget:
                entry["widget"] = {"name": slot.name}
            if slot.optional:
                entry["shape"] = OPTIONAL_SHAPE
            value = node.inputs.get(slot.name)
            if isinstance(value, Out):
                source_def = defs[graph.nodes[value.node].class_type]
                source_slot = source_def.output_index(value.output)
                link_id = len(links) + 1
                links.append([link_id, ids[value.node], source_slot, ids[key], index, source_def.outputs[source_slot][1]])
                out_links.setdefault((value.node, source_slot), []).append(link_id)
                entry["link"] = link_id
            inputs.append(entry)
        values = []
        for name, default in definition.widgets:
            if name in ("control_after_generate", "upload"):
                values.append(default)
            else:
                value = node.inputs.get(name, default)
                if isinstance(value, Out):
                    raise ValueError(f"{key}.{name}: widget inputs are not linked in shipped workflows")
                values.append(value)
        ui_nodes.append({"id": ids[key], "type": node.class_type, "pos": list(geo.pos[key]), "size": list(geo.size[key]),
                         "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": [],
                         "properties": {**pack_of(node.class_type), "Node name for S&R": node.class_type},
                         "widgets_values": values,
                         **({"title": node.title} if node.title else {})})
    for ui_node, key in zip(ui_nodes, graph.nodes):
        definition = defs[graph.nodes[key].class_type]
        ui_node["outputs"] = [{"name": name, "type": kind, "links": out_links.get((key, i), [])}
                              for i, (name, kind) in enumerate(definition.outputs)]
    reroutes, extensions = route_long_wires(ui_nodes, links, geo, {ids[k]: n.lane for k, n in graph.nodes.items()})
    # Move everything down so the highest bus track sits at y = 0: the stored view then shows it all.
    top = min([r["pos"][1] for r in reroutes] + [n["pos"][1] - TITLE_H for n in ui_nodes] + [g[2][1] for g in geo.groups])
    for n in ui_nodes:
        n["pos"][1] -= top
    for r in reroutes:
        r["pos"][1] -= top
    geo.groups[:] = [(t, c, (b[0], b[1] - top, b[2], b[3])) for t, c, b in geo.groups]
    note_id = len(graph.nodes) + 1
    x, y, w, h = geo.note
    y -= top
    ui_nodes.append({"id": note_id, "type": "Note", "pos": [x, y], "size": [w, h], "flags": {}, "order": len(ui_nodes),
                     "mode": 0, "inputs": [], "outputs": [], "title": "Read me first", "properties": {},
                     "widgets_values": [graph.note], "color": "#432", "bgcolor": "#653"})
    groups = [{"id": i + 1, "title": title, "bounding": list(box), "color": colour, "font_size": 24, "flags": {}}
              for i, (title, colour, box) in enumerate(geo.groups)]
    extra_routes = {"reroutes": reroutes, "linkExtensions": extensions} if reroutes else {}
    return {"id": _stable_uuid(graph.file), "revision": 0, "last_node_id": note_id, "last_link_id": len(links),
            "nodes": ui_nodes, "links": links, "groups": groups, "config": {},
            "extra": {"ds": {"scale": 1.0, "offset": list(VIEW_OFFSET)}, "frontendVersion": frontend_version, **extra_routes,
                      "keyface": "generated by scripts/make_workflows.py from the host's object_info"},
            "version": 0.4}


# Which node pack provides each node, as workflows exported by the frontend record it. Without it the
# frontend asks the registry (api.comfy.org) which pack provides every custom node of a loaded workflow.
packs: dict[str, tuple[str, str]] = {}


def pack_of(class_type: str) -> dict:
    cnr_id, version = packs.get(class_type, ("comfy-core", ""))
    return {"cnr_id": cnr_id, "ver": version}


def _stable_uuid(name: str) -> str:
    import uuid
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "keyface-workflow:" + name))


# ------------------------------------------------------------------------------------ readability checks

def _bezier(a, b, steps=48):
    dist = math.dist(a, b)
    c1, c2 = (a[0] + dist * 0.25, a[1]), (b[0] - dist * 0.25, b[1])
    for i in range(steps + 1):
        t = i / steps
        mt = 1 - t
        yield (mt ** 3 * a[0] + 3 * mt * mt * t * c1[0] + 3 * mt * t * t * c2[0] + t ** 3 * b[0],
               mt ** 3 * a[1] + 3 * mt * mt * t * c1[1] + 3 * mt * t * t * c2[1] + t ** 3 * b[1])


def readability_problems(rects: dict, wires: list, margin: float = -2) -> list[str]:
    """What makes a graph hard to read: overlapping nodes, wires running right to left, wires under nodes.

    rects: node id -> (x, y, w, h) including the title bar; wires: (source id, target id, start xy, end xy);
    margin grows (or, negative, shrinks) each node for the wire test: the generator plans with a safety margin.
    The wire shape is litegraph's spline (control points a quarter of the distance out horizontally).
    """
    problems = []
    ids = sorted(rects)
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            ra, rb = rects[a], rects[b]
            if ra[0] < rb[0] + rb[2] and rb[0] < ra[0] + ra[2] and ra[1] < rb[1] + rb[3] and rb[1] < ra[1] + ra[3]:
                problems.append(f"nodes {a} and {b} overlap")
    for source, target, start, end in wires:
        if end[0] < start[0]:
            problems.append(f"wire {source}->{target} runs right to left")
        for other, (x, y, w, h) in rects.items():
            if other in (source, target):
                continue
            if any(x - margin < px < x + w + margin and y - margin < py < y + h + margin for px, py in _bezier(start, end)):
                problems.append(f"wire {source}->{target} runs under node {other}")
    return problems


def _slot_points(ui_nodes: list, links: list) -> dict:
    """link id -> (source id, target id, output xy, input xy), placed as litegraph places slots."""
    by_id = {n["id"]: n for n in ui_nodes}
    points = {}
    for link_id, source, source_slot, target, target_slot, _ in links:
        s, t = by_id[source], by_id[target]
        socket_row = [i for i, slot in enumerate(t["inputs"]) if "widget" not in slot].index(target_slot)
        start = (s["pos"][0] + s["size"][0], s["pos"][1] + (source_slot + 0.7) * SLOT_H)
        end = (t["pos"][0], t["pos"][1] + (socket_row + 0.7) * SLOT_H)
        points[link_id] = (source, target, start, end)
    return points


def _rects(ui_nodes: list) -> dict:
    return {n["id"]: (n["pos"][0], n["pos"][1] - TITLE_H, n["size"][0], n["size"][1] + TITLE_H) for n in ui_nodes}


PLAN_MARGIN = 10   # px around each node that a planned wire keeps clear of (the frontend places slots a bit differently)


def _under_any(start, end, rects, skip) -> bool:
    m = PLAN_MARGIN
    return any(any(x - m < px < x + w + m and y - m < py < y + h + m for px, py in _bezier(start, end))
               for other, (x, y, w, h) in rects.items() if other not in skip)


BUS_GAP, TRACK_GAP, REROUTE_INSET = 40, 16, 45


def route_long_wires(ui_nodes: list, links: list, geo: "Layout", lane_of: dict) -> tuple[list, list]:
    """Native litegraph reroutes for every wire whose direct spline would run under another node.

    Such a wire leaves its source, climbs (or drops) to a bus track above (below) all nodes in the gap
    right of the source, runs straight along it and comes down (up) in the gap left of its target.
    Outputs of lanes above or in the chain use the top bus, outputs of the lanes below it the bottom
    bus; each routed output gets its own track, and its wires share the reroute at the source.
    """
    rects = _rects(ui_nodes)
    points = _slot_points(ui_nodes, links)
    band_top = min(b[1] for _, _, b in geo.groups)
    band_bottom = max(b[1] + b[3] for _, _, b in geo.groups)
    reroutes, extensions, first = [], [], {}
    tracks = {"top": 0, "bottom": 0}
    for link_id, source, source_slot, target, target_slot, _ in links:
        _, _, start, end = points[link_id]
        if not _under_any(start, end, rects, {source, target}):
            continue
        side = "bottom" if lane_of.get(source, 0) > 0 else "top"
        if (source, source_slot) not in first:
            track = tracks[side]
            tracks[side] += 1
            y = band_top + GROUP_TITLE // 2 - BUS_GAP - track * TRACK_GAP if side == "top" else \
                band_bottom + BUS_GAP + track * TRACK_GAP
            rid = len(reroutes) + 1
            reroutes.append({"id": rid, "pos": [start[0] + REROUTE_INSET, y], "linkIds": []})
            first[(source, source_slot)] = (rid, y)
        parent, y = first[(source, source_slot)]
        rid = len(reroutes) + 1
        reroutes.append({"id": rid, "parentId": parent, "pos": [end[0] - REROUTE_INSET, y], "linkIds": [link_id]})
        reroutes[parent - 1]["linkIds"].append(link_id)
        extensions.append({"id": link_id, "parentId": rid})
    return reroutes, extensions


def planned_geometry(workflow: dict, defs: dict | None = None) -> tuple[dict, list]:
    """The rects and wire segments of a generated UI workflow (through its reroutes), as litegraph places them."""
    rects = _rects(workflow["nodes"])
    points = _slot_points(workflow["nodes"], workflow["links"])
    reroutes = {r["id"]: r for r in workflow.get("extra", {}).get("reroutes", [])}
    parent_of = {e["id"]: e["parentId"] for e in workflow.get("extra", {}).get("linkExtensions", [])}
    wires = []
    for link_id, (source, target, start, end) in points.items():
        chain, rid = [], parent_of.get(link_id)
        while rid is not None:
            chain.append(tuple(reroutes[rid]["pos"]))
            rid = reroutes[rid].get("parentId")
        stops = [start, *reversed(chain), end]
        for a, b in zip(stops, stops[1:]):
            wires.append((source, target, a, b))
    return rects, wires
