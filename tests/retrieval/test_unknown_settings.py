"""Unknown CLIPSEARCH_* variables: each is named with the nearest setting; the variables the
test suite, the benchmarks and the scripts use are never warned about."""

from __future__ import annotations

import re
from pathlib import Path

from retrieval.config import NOT_SETTINGS, setting_variables, unknown_settings

REPO = Path(__file__).resolve().parents[2]
# The misspelt names the tests set on purpose (here and in the command-line tests).
TYPOS = {"CLIPSEARCH_PRETRAINE", "CLIPSEARCH_BATCHSIZE", "CLIPSEARCH_NOTHING_LIKE_IT"}


def test_a_typo_is_named_with_the_nearest_setting() -> None:
    environ = {
        "CLIPSEARCH_PRETRAINE": "none",
        "CLIPSEARCH_BATCHSIZE": "8",
        "CLIPSEARCH_NOTHING_LIKE_IT": "1",
        "CLIPSEARCH_MODEL": "ViT-B-32",  # a setting
        "clipsearch_device": "cpu",  # a setting too: they are read whatever the case
        "CLIPSEARCH_TEST_DATABASE_URL": "postgresql://x@y/z",  # the test suite's
        "HOME": "/root",
    }
    assert unknown_settings(environ) == [
        "CLIPSEARCH_BATCHSIZE is not a setting and is ignored; did you mean CLIPSEARCH_BATCH_SIZE?",
        "CLIPSEARCH_NOTHING_LIKE_IT is not a setting and is ignored; the settings are listed "
        "under Configuration in the README",
        "CLIPSEARCH_PRETRAINE is not a setting and is ignored; did you mean CLIPSEARCH_PRETRAINED?",
    ]


def test_every_variable_the_project_names_is_a_setting_or_allowed() -> None:
    """What the code, tests, benchmarks, scripts, docker files and docs name (a new test-only
    variable must join NOT_SETTINGS, or users running the suite would be warned about it)."""
    files = [REPO / "README.md", REPO / "pyproject.toml", REPO / ".ci" / "run"]
    for folder in (
        "retrieval",
        "indexer",
        "api",
        "tests",
        "bench",
        "scripts",
        "docker",
        "examples",
    ):
        files += [
            path
            for path in (REPO / folder).rglob("*")
            if path.is_file() and path.suffix in {".py", ".sh", ".md", ".yaml", ".yml", ".js", ""}
        ]
    named: set[str] = set()
    for path in files:
        if path.is_file():
            text = path.read_text(errors="replace")
            named |= set(re.findall(r"CLIPSEARCH_[A-Z0-9_]*[A-Z0-9]", text))
    assert "CLIPSEARCH_TEST_DATABASE_URL" in named  # the files were read
    unknown = named - set(setting_variables()) - NOT_SETTINGS - TYPOS
    assert unknown == set(), "names that are neither a setting nor in NOT_SETTINGS"
    assert set(setting_variables()).isdisjoint(NOT_SETTINGS)
