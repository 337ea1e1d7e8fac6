"""The README's "Use a model" snippet runs as written, on a small trained model and a synthetic image."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_snippet() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Use a model", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert match, "README: no python block under '## Use a model'"
    return match.group(1)


def test_readme_python_api_snippet_runs(eval_model, eval_data, tmp_path, monkeypatch):
    from medclipin.data.manifest import read_manifest

    records = read_manifest(eval_data).split("test")
    image = next(r.image_path for r in records)
    code = readme_snippet()
    # the README names the demo's files; here they are the test fixtures'
    code = code.replace('"demo_out/run"', repr(str(eval_model)))
    code = code.replace('"demo_out/data/dicom/SYN00002_01.dcm"', repr(image))
    code = code.replace('"demo_out/gradcam_example.png"', repr(str(tmp_path / "explained.png")))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    scores = namespace["scores"]
    assert scores.scores.shape == (1, 5) and ((scores.scores >= 0) & (scores.scores <= 1)).all()
    assert len(namespace["hits"]) == 1 and 0 <= namespace["hits"][0].index < len(namespace["gallery"])
    assert (tmp_path / "explained.png").is_file()
