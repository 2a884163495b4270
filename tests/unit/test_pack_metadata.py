"""Registry metadata, requirements and the pack's import-safety (no ComfyUI needed)."""

import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_is_valid_for_the_comfy_registry():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = data["project"]
    assert "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["description"] and project["license"]
    assert isinstance(project["dependencies"], list)
    assert project["urls"]["Repository"].startswith("https://")
    comfy = data["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]


def test_no_requirement_pins_torch():
    for name in ("requirements.txt",):
        for line in (ROOT / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            assert not re.match(r"^(torch|torchvision|torchaudio)\b", line), f"{name} must not pin {line}"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not any(re.match(r"^(torch|torchvision)\b", d) for d in deps)


def test_pack_imports_without_comfyui():
    """The package and its pure parts import in a fresh interpreter that has no ComfyUI at all."""
    code = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("mc", {str(ROOT / "__init__.py")!r}, submodule_search_locations=[{str(ROOT)!r}])
m = importlib.util.module_from_spec(spec); sys.modules["mc"] = m; spec.loader.exec_module(m)
import mc.samplers.edlora.layerwise, mc.samplers.edlora.tokens, mc.samplers.edlora.clip
import mc.formats.weights, mc.formats.edlora, mc.formats.lora, mc.formats.fused, mc.formats.open_clip
import mc.formats.convert_edlora, mc.samplers.concept_stack.files
import mc.samplers.concept_stack.placement, mc.samplers.scoped_lora.runtime, mc.samplers.regions.preview
assert m.WEB_DIRECTORY == "./web"
assert not any(k == "comfy" or k.startswith(("comfy.", "comfy_api", "folder_paths")) for k in sys.modules), "ComfyUI imported"
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_every_node_file_has_a_help_page():
    ids = re.findall(r'node_id="([^"]+)"', "".join(p.read_text() for p in (ROOT / "nodes").glob("*.py")))
    assert ids
    for node_id in ids:
        assert node_id.startswith("MultiConcept")
        page = ROOT / "web" / "docs" / f"{node_id}.md"
        assert page.is_file() and len(page.read_text()) > 300, node_id
