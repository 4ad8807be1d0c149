"""`keyless --version` and the help of every subcommand (issue 16, item 9): walking build_parser(), every
option of every subcommand has help text that shows its default, and the long-running commands share one
log-level flag, `--log-level`."""
from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

import keyless
from keyless import cli

LONG_RUNNING = ("operator", "broker", "agent", "webhooks")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def rendered_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser._get_formatter()
    return formatter._expand_help(action) if action.help else ""


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.build_parser().parse_args(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"keyless {keyless.__version__}"
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"keyless {keyless.__version__}"


def test_version_from_the_installed_command():
    result = subprocess.run([sys.executable, "-m", "keyless.cli", "--version"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"keyless {keyless.__version__}"


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_every_option_has_help_that_shows_its_default(command):
    parser = subcommands()[command]
    problems = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        name = "/".join(action.option_strings) or action.dest
        text = rendered_help(parser, action)
        if not text.strip():
            problems.append(f"{name}: no help")
            continue
        if action.option_strings and not action.required and not re.search(r"\bdefault\b", text, re.I):
            problems.append(f"{name}: help does not show the default ({text!r})")
        if "%(" in text or "None" in re.findall(r"default:? (\w+)", text):
            problems.append(f"{name}: help shows a raw or unset default ({text!r})")
    assert not problems, f"keyless {command}:\n" + "\n".join(problems)
    # and the help renders (no broken %-format in any help string)
    assert parser.format_help()


def test_one_log_level_flag_across_long_running_commands():
    for command in LONG_RUNNING:
        parser = subcommands()[command]
        flags = {s for a in parser._actions for s in a.option_strings}
        assert "--log-level" in flags, command
        assert "--verbose" not in flags, command
        required = [f"--{a.dest.replace('_', '-')}=x" for a in parser._actions if a.required and a.option_strings]
        assert parser.parse_args([*required, "--log-level=debug"]).log_level == "DEBUG"


def test_the_webhooks_command_the_readme_names_is_the_one_the_chart_runs():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    template = (root / "charts/keyless/templates/webhooks.yaml").read_text()
    assert "command:" not in template and re.search(r"args:\s*\n\s*- webhooks\n", template)
    for doc in ("README.md", "charts/keyless/README.md", "docs/CONTRACTS.md"):
        text = (root / doc).read_text()
        assert "`keyless webhooks" in text, doc
        assert "python -m keyless.webhooks" not in text, doc
