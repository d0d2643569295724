"""The README's quickstart runs as written (the first ```python block under "## Quickstart")."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def quickstart_code() -> str:
    section = README.read_text(encoding="utf-8").split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert blocks, "README.md has no ```python block under '## Quickstart'"
    return blocks[0]


def test_readme_quickstart_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the quickstart saves a model folder into the working directory
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(quickstart_code(), str(README), "exec"), namespace)
    generated, scores = namespace["generated"], namespace["scores"]
    assert generated.shape == (4, 3, 32, 32) and scores.shape == (4,)
    assert torch.isfinite(scores).all()
    # the model reloaded at the end of the block is the one that was saved
    reloaded, text = namespace["dalle"], namespace["text"]
    assert (tmp_path / "my_dalle" / "config.json").is_file()
    assert reloaded.text_seq_len == text.shape[1] and reloaded.num_text_tokens >= 10000


def test_readme_links_point_at_files_in_the_repository():
    links = re.findall(r"\]\(([^)\s]+)\)", README.read_text(encoding="utf-8"))
    local = [link.split("#", 1)[0] for link in links if not re.match(r"[a-z]+://", link)]
    assert local, "README.md links to no local file"
    missing = [link for link in local if not (README.parent / link).exists()]
    assert not missing, f"README.md links to missing files: {missing}"
