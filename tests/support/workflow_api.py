"""Turns a UI-format workflow (what workflows/ ships) into an API prompt, using the server's /object_info.

The frontend does this when the Queue button is pressed; the e2e tests do it without a browser. Widget
values are matched to inputs in the order /object_info lists them; an INT with control_after_generate
(a seed) carries one extra UI-only value ("fixed"/"randomize"). Bypassed nodes (mode 4) are left out and
a link from one is followed through it as the frontend does (litegraph's ExecutableNodeDTO.resolveOutput):
to the input at the same slot as the output when its type fits, else the first input of the same type.
"""

from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", "MC_REGIONS_EDITOR"}  # + this pack's canvas widget


def _is_widget(spec) -> bool:
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _has_control_after_generate(spec) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return bool(opts.get("control_after_generate"))


def _fits(a, b) -> bool:
    return a == b or "*" in (a, b) or "" in (a, b)


def _resolve(links: dict, nodes: dict, link_id: int):
    """``[source_id, slot]`` of the first non-bypassed node behind ``link_id``; None when a bypassed node on
    the way has no connected input of the right type (the frontend then sends no value for the input)."""
    _, src, slot, _, _, wanted = links[link_id]
    seen = set()
    while nodes.get(src, {}).get("mode", 0) == 4:
        if (src, slot) in seen:
            raise ValueError(f"bypassed nodes form a loop at node {src}")
        seen.add((src, slot))
        node = nodes[src]
        inputs = node.get("inputs", [])
        out_type = node["outputs"][slot]["type"]
        same = inputs[slot] if slot < len(inputs) else None
        if same is not None and _fits(same["type"], out_type) and _fits(same["type"], wanted):
            index = slot
        else:
            index = next((i for i, inp in enumerate(inputs) if inp["type"] == wanted), -1)
            if index == -1:
                index = next(
                    (i for i, inp in enumerate(inputs) if _fits(inp["type"], out_type) and _fits(inp["type"], wanted)),
                    -1,
                )
        if index == -1 or inputs[index].get("link") is None:
            return None
        _, src, slot, *_ = links[inputs[index]["link"]]
    return [str(src), slot]


def workflow_to_api(workflow: dict, object_info: dict, overrides: dict | None = None) -> dict:
    """``overrides``: {node_id: {input_name: value}} applied after conversion (e.g. test file names)."""
    links = {link[0]: link for link in workflow["links"]}
    nodes = {node["id"]: node for node in workflow["nodes"]}
    prompt = {}
    for node in workflow["nodes"]:
        info = object_info.get(node["type"])
        if info is None or node.get("mode", 0) in (2, 4):
            continue  # notes, reroutes and muted/bypassed nodes are not sent
        inputs = {}
        linked = {i["name"]: i.get("link") for i in node.get("inputs", [])}
        values = list(node.get("widgets_values") or [])
        order = info.get("input_order") or {
            "required": list(info["input"].get("required", {})),
            "optional": list(info["input"].get("optional", {})),
        }
        for section in ("required", "optional"):
            specs = info["input"].get(section, {})
            for name in order.get(section, []):
                spec = specs[name]
                if _is_widget(spec) and values:
                    value = values.pop(0)
                    if _has_control_after_generate(spec) and values:
                        values.pop(0)
                    inputs[name] = value
                link_id = linked.get(name)
                if link_id is not None:
                    source = _resolve(links, nodes, link_id)
                    if source is not None:
                        inputs[name] = source
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    for node_id, values in (overrides or {}).items():
        prompt[str(node_id)]["inputs"].update(values)
    return prompt
