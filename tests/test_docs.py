"""README's set-up commands are the ones CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_test_command_readme_gives():
    readme = (ROOT / "README.md").read_text()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    test_command = ci_lines[-1]
    assert test_command.startswith("python -m pytest")
    assert f"\n{test_command}\n" in readme
    assert "irank demo" in readme


def test_changelog_names_the_current_version():
    from irank import __version__

    assert f"[{__version__}]" in (ROOT / "CHANGELOG.md").read_text()
