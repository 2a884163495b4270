"""Release engineering: one pinned ComfyUI version named alike everywhere, the changelog, the workflows."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PINNED = PYPROJECT["tool"]["multiconcept"]["comfyui_version"]
VERSION = PYPROJECT["project"]["version"]


def _workflow(name: str) -> dict:
    data = yaml.safe_load((ROOT / ".github" / "workflows" / name).read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as True
    return data


def test_pinned_comfyui_is_a_release_version():
    assert re.fullmatch(r"\d+\.\d+\.\d+", PINNED), PINNED


def test_readme_names_the_pinned_comfyui():
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"ComfyUI (\d+\.\d+\.\d+)", readme))
    assert named == {PINNED}, f"README names ComfyUI {sorted(named)}, pyproject pins {PINNED}"


def test_ci_matrix_is_the_pinned_comfyui_and_the_latest_release():
    test = _workflow("test.yml")
    job = test["jobs"]["test"]
    assert job["strategy"]["matrix"]["comfyui"] == [PINNED, "latest"]
    assert job["env"]["MULTICONCEPT_COMFYUI_VERSION"] == "${{ matrix.comfyui }}"
    commands = [step.get("run", "") for step in job["steps"]]
    assert "bash scripts/test.sh" in commands, "CI must run exactly the README's test command"
    assert "python" in job["container"] and "bookworm" in job["container"]  # Debian: test.sh installs chromium
    assert {"push", "pull_request"} <= set(test["on"])


def test_publish_workflow_uses_the_registry_action_when_the_version_changes():
    publish = _workflow("publish.yml")
    assert publish["on"]["push"]["branches"] == ["main"] and publish["on"]["push"]["paths"] == ["pyproject.toml"]
    steps = publish["jobs"]["publish"]["steps"]
    action = [s for s in steps if "publish-node-action" in s.get("uses", "")]
    assert len(action) == 1 and action[0]["uses"].startswith("Comfy-Org/publish-node-action@")
    assert action[0]["with"]["personal_access_token"] == "${{ secrets.REGISTRY_ACCESS_TOKEN }}"
    assert publish["jobs"]["publish"]["if"] == "needs.version-changed.outputs.changed == 'true'"


def test_ci_entry_point_is_the_readme_test_command():
    run = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^exec bash scripts/test\.sh\b", run, re.M)
    assert "bash scripts/test.sh" in (ROOT / "README.md").read_text()


def test_test_command_reads_the_pin_from_pyproject():
    script = (ROOT / "scripts" / "test.sh").read_text()
    assert "comfyui_version" in script and "0.3." not in script, "the version must live in pyproject.toml only"


def test_changelog_top_release_is_the_project_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## \[([^\]]+)\](?: - (\d{4}-\d{2}-\d{2}))?", text, re.M)
    assert headings[0] == ("Unreleased", "")
    releases = [v for v, _ in headings[1:]]
    assert releases and releases[0] == VERSION, f"CHANGELOG's newest release {releases[:1]} != pyproject {VERSION}"
    as_tuples = [tuple(int(p) for p in v.split(".")) for v in releases]
    assert as_tuples == sorted(as_tuples, reverse=True) and len(set(as_tuples)) == len(as_tuples)
    assert all(d for _, d in headings[1:]), "every release has a date"
    for v, _ in headings:
        assert re.search(rf"^\[{re.escape(v)}\]: https://", text, re.M), f"no link for [{v}]"
