"""Turns a UI-format workflow (what workflows/ ships) into an API prompt, using the server's /object_info.

The frontend does this when the Queue button is pressed; the e2e tests do it without a browser. Widget
values are matched to inputs in the order /object_info lists them; an INT with control_after_generate
(a seed) carries one extra UI-only value ("fixed"/"randomize").
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


def workflow_to_api(workflow: dict, object_info: dict, overrides: dict | None = None) -> dict:
    """``overrides``: {node_id: {input_name: value}} applied after conversion (e.g. test file names)."""
    links = {link[0]: link for link in workflow["links"]}
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
                    _, src, slot, *_ = links[link_id]
                    inputs[name] = [str(src), slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    for node_id, values in (overrides or {}).items():
        prompt[str(node_id)]["inputs"].update(values)
    return prompt
