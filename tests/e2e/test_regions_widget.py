"""The region canvas in a real browser: headless Chromium, the real ComfyUI frontend, our widget.

Draws two boxes with mouse events, edits a prompt, queues the graph and checks what the backend got;
saves and reloads the workflow; refuses a bad edit. Screenshots go to tests/output/.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

OUT = Path(__file__).resolve().parents[1] / "output"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-sync",
    "--disable-component-update",
]


pytestmark = pytest.mark.browser  # with ComfyUI present, tests/conftest.py turns a skip here into a failure


@pytest.fixture(scope="session", autouse=True)
def browser_api():
    """playwright's sync API, once Chromium is known to be there. Session-scoped and autouse, so it is
    checked before the (session-scoped) server is started for these tests."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if CHROMIUM is None:
        pytest.skip("Chromium not found: install Debian's 'chromium' package (scripts/test.sh does when run as root)")
    return sync_api


@pytest.fixture(scope="module")
def page(browser_api, comfy_server):
    sync_api = browser_api
    OUT.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        page.goto(comfy_server.url)
        page.wait_for_function("() => window.app && window.app.graph && window.app.extensionManager", timeout=120_000)
        page.wait_for_timeout(1500)
        page.keyboard.press("Escape")  # the first load opens the template browser
        yield page
        browser.close()


ADD_NODES = """() => {
  const LG = window.LiteGraph;
  app.graph.clear();
  const n = LG.createNode('MultiConceptRegions');
  n.pos = [60, 60];
  app.graph.add(n);
  n.widgets.find(w => w.name === 'width').value = 512;
  n.widgets.find(w => w.name === 'height').value = 384;
  n.setSize([460, Math.max(n.size[1], 640)]);
  const p = LG.createNode('PreviewImage');
  p.pos = [600, 60];
  app.graph.add(p);
  n.connect(3, p, 0);
  app.canvas.ds.offset = [0, 0];
  app.canvas.ds.scale = 1;
  app.canvas.setDirty(true, true);
  n.widgets.find(w => w.name === 'regions').value = JSON.stringify({version: 1, boxes: []});
  return n.id;
}"""

WIDGET_VALUE = "(id) => app.graph.getNodeById(id).widgets.find(w => w.name === 'regions').value"


def drag(page, box, start, end):
    """Drag on the canvas from/to fractions of its size."""
    x0 = box["x"] + start[0] * box["width"]
    y0 = box["y"] + start[1] * box["height"]
    x1 = box["x"] + end[0] * box["width"]
    y1 = box["y"] + end[1] * box["height"]
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x1, y1, steps=6)
    page.mouse.up()


def test_draw_edit_queue_save_reload(page, comfy_server):
    node_id = page.evaluate(ADD_NODES)
    canvas = page.locator(".mc-regions canvas").first
    canvas.wait_for(state="visible", timeout=30_000)
    page.wait_for_timeout(500)
    box = canvas.bounding_box()
    assert box and box["width"] > 100

    drag(page, box, (0.05, 0.10), (0.45, 0.90))
    drag(page, box, (0.55, 0.20), (0.95, 0.80))
    page.locator(".mc-regions .mc-label").first.fill("dog")
    page.locator(".mc-regions .mc-prompt").first.fill("a <dog1> <dog2> running")
    page.locator(".mc-regions .mc-negative").first.fill("cartoon")
    page.screenshot(path=str(OUT / "regions_widget_drawn.png"))

    state = json.loads(page.evaluate(WIDGET_VALUE, node_id))
    assert len(state["boxes"]) == 2
    first, second = state["boxes"]
    # snapped to the 8-pixel grid of the 512x384 image
    for b in state["boxes"]:
        assert abs(b["x"] * 512 - round(b["x"] * 512 / 8) * 8) < 1e-6
        assert abs(b["h"] * 384 - round(b["h"] * 384 / 8) * 8) < 1e-6
    assert first["x"] < 0.1 and first["w"] > 0.35 and first["prompt"] == ""
    assert second["x"] > 0.5 and second["prompt"] == "a <dog1> <dog2> running" and second["label"] == "dog"
    assert second["negative"] == "cartoon" and first["color"] != second["color"]

    # move the first box right by dragging its middle, then resize it from its bottom-right corner
    drag(page, box, (0.25, 0.5), (0.30, 0.5))
    moved = json.loads(page.evaluate(WIDGET_VALUE, node_id))["boxes"][0]
    assert moved["x"] > first["x"] + 0.03 and moved["w"] == first["w"] and moved["y"] == first["y"]
    corner = (moved["x"] + moved["w"], moved["y"] + moved["h"])
    drag(page, box, corner, (corner[0] + 0.02, corner[1] - 0.2))
    resized = json.loads(page.evaluate(WIDGET_VALUE, node_id))["boxes"][0]
    assert resized["x"] == moved["x"] and resized["h"] < moved["h"] - 0.15 and resized["w"] > moved["w"]
    state = json.loads(page.evaluate(WIDGET_VALUE, node_id))
    page.screenshot(path=str(OUT / "regions_widget_moved.png"))

    # queue it the way the Queue button does; the backend must receive exactly these boxes
    sent = page.evaluate("async () => (await app.graphToPrompt()).output")
    assert json.loads(sent[str(node_id)]["inputs"]["regions"]) == state
    started = time.time()
    page.evaluate("async () => await app.queuePrompt(0, 1)")
    entry = None
    while time.time() - started < 120 and entry is None:
        history = comfy_server.get("/history").json()
        for item in history.values():
            inputs = item["prompt"][2].get(str(node_id), {}).get("inputs", {})
            if inputs.get("regions") and json.loads(inputs["regions"]) == state and item["status"].get("completed"):
                entry = item
        time.sleep(0.5)
    assert entry is not None, "the queued prompt did not reach the history"
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert any(o.get("images") for o in entry["outputs"].values())  # the preview was made

    # save and reload the workflow: the boxes survive
    saved = page.evaluate("() => JSON.stringify(app.graph.serialize())")
    page.evaluate("async (wf) => { app.graph.clear(); await app.loadGraphData(JSON.parse(wf)); }", saved)
    page.wait_for_timeout(800)
    reloaded = json.loads(page.evaluate(WIDGET_VALUE, node_id))
    assert reloaded == state
    drawn = page.evaluate(
        "(id) => app.graph.getNodeById(id).widgets.find(w => w.name === 'regions').regionEditor.state.boxes.length",
        node_id,
    )
    assert drawn == 2
    page.screenshot(path=str(OUT / "regions_widget_reloaded.png"))


def test_bad_edit_is_refused_and_boxes_stay(page):
    node_id = page.evaluate(ADD_NODES)
    good = {
        "version": 1,
        "units": "fraction",
        "boxes": [
            {
                "x": 0.1,
                "y": 0.1,
                "w": 0.3,
                "h": 0.3,
                "prompt": "a cat",
                "negative": "",
                "label": "cat",
                "color": "#e6194b",
            }
        ],
    }
    page.evaluate(
        "([id, v]) => { app.graph.getNodeById(id).widgets.find(w => w.name === 'regions').value = v; }",
        [node_id, json.dumps(good)],
    )
    for bad in [
        "{broken",
        json.dumps({"boxes": [{"x": 0, "y": 0, "w": -1, "h": 0.2}]}),
        json.dumps({"boxes": [{"x": "NaN", "y": 0, "w": 0.1, "h": 0.2}]}),
    ]:
        page.evaluate(
            "([id, v]) => { app.graph.getNodeById(id).widgets.find(w => w.name === 'regions').value = v; }",
            [node_id, bad],
        )
        assert json.loads(page.evaluate(WIDGET_VALUE, node_id)) == good
    error = page.locator(".mc-regions .mc-error").last.inner_text()
    assert "refused" in error
    # deleting with the keyboard: select the box, press Delete
    canvas = page.locator(".mc-regions canvas").last
    box = canvas.bounding_box()
    page.mouse.click(box["x"] + 0.2 * box["width"], box["y"] + 0.2 * box["height"])
    page.keyboard.press("Delete")
    assert json.loads(page.evaluate(WIDGET_VALUE, node_id))["boxes"] == []


def test_shipped_workflows_load_in_the_frontend(page, comfy_server):
    """Each workflows/*.json loads in the real frontend and converts to the prompt our e2e tests send."""
    from tests.support.workflow_api import workflow_to_api

    info = comfy_server.object_info()
    for path in sorted((Path(__file__).resolve().parents[2] / "workflows").glob("*.json")):
        workflow = json.loads(path.read_text())
        page.evaluate("async (wf) => { app.graph.clear(); await app.loadGraphData(wf); }", workflow)
        page.wait_for_timeout(500)
        sent = page.evaluate("async () => (await app.graphToPrompt()).output")
        ours = workflow_to_api(workflow, info)
        assert set(sent) == set(ours), path.name
        for node_id, node in ours.items():
            assert sent[node_id]["class_type"] == node["class_type"]
            for name, value in node["inputs"].items():
                got = sent[node_id]["inputs"].get(name)
                if name == "regions" and isinstance(value, str):
                    assert json.loads(got) == json.loads(value), (path.name, node_id)
                else:
                    assert got == value, (path.name, node_id, name)
        page.screenshot(path=str(OUT / f"workflow_{path.stem}.png"))
