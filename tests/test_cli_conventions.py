"""The command line behaves like the tools its users know: usage on a bare command, --version, short flags,
help text with defaults on every flag, one meaning of --format and --json, progress on stderr only."""
import csv
import io
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import run_cli


def test_bare_command_lists_the_commands_and_writes_nothing(tmp_path):
    p = subprocess.run([sys.executable, "-m", "slm_export.cli"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    for command in ("export", "demo", "generate", "verify", "bench", "fit", "devices", "bundle", "inspect", "targets"):
        assert f"\n    {command} " in p.stdout, command
    assert list(tmp_path.iterdir()) == []  # it never starts an export
    assert run_cli("--help")[1] == p.stdout


def test_version():
    from slm_export import __version__

    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"slm-export {__version__}"


def test_every_option_of_every_command_has_help_and_shows_its_default():
    from slm_export.cli import COMMANDS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in COMMANDS:
        p = sub.choices[name]
        for action in p._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings} has no help text"
        formatter = p._get_formatter()
        for action in p._actions:
            if action.option_strings and action.default not in (None, False) and action.dest != "help":
                shown = formatter._get_help_string(action)
                assert "default" in shown, f"{name} {action.option_strings[-1]}: its help does not show the default"
        p.format_help()  # every help string formats


def test_short_flags_and_the_export_subcommand(tmp_path, tiny_dir):
    code, out, err = run_cli("export", "-m", tiny_dir, "-t", "onnx", "-o", tmp_path / "a", "--max-context", "64", "-q")
    assert code == 0, err
    assert (tmp_path / "a" / "manifest.json").is_file()
    assert err.strip() == "", err  # --quiet: nothing on stderr
    # the documented shorthand: options without a command export
    code, _, err = run_cli("-m", tiny_dir, "-o", tmp_path / "b", "--max-context", "64", "--bits", "8")
    assert code == 0, err and (tmp_path / "b" / "manifest.json").is_file()


def test_export_subcommand_refuses_a_bare_model_word():
    code, _, err = run_cli("export", "some/model")
    assert code == 2 and "pass it as --model: slm-export export --model some/model" in err


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from conftest import tiny_model

    import slm_export

    d = tmp_path_factory.mktemp("conv")
    return slm_export.export(tiny_model("llama"), out=d / "a", max_context=64, log=lambda *a: None).path


def test_format_and_json_mean_the_same_everywhere(tiny_export, tmp_path):
    # inspect: --format json prints JSON; --json FILE writes the same
    code, out, err = run_cli("inspect", tiny_export, "--format", "json", "--json", tmp_path / "i.json")
    assert code == 0, err
    assert json.loads(out) == json.loads((tmp_path / "i.json").read_text())
    code, out, _ = run_cli("inspect", tiny_export)
    assert code == 0 and not out.lstrip().startswith("{")
    # fit: the same two
    code, out, err = run_cli("fit", "-d", "raspberry-pi-5", "--artifact", tiny_export, "--format", "json",
                             "--json", tmp_path / "f.json")
    assert code in (0, 1), err
    assert json.loads(out) == json.loads((tmp_path / "f.json").read_text())


def test_bench_prints_csv_and_jsonl(tiny_export, tmp_path):
    args = ("bench", tiny_export, "--prompt-tokens", "4,8", "--decode-tokens", "4", "--warmup", "1", "--repeats", "1")
    code, out, err = run_cli(*args, "--format", "csv")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["prompt_tokens"] for r in rows] == ["4", "8"] and float(rows[0]["decode_tok_s"]) > 0
    code, out, err = run_cli(*args, "--format", "jsonl", "--json", tmp_path / "b.json")
    assert code == 0, err
    lines = [json.loads(l) for l in out.strip().splitlines()]
    assert [r["prompt_tokens"] for r in lines] == [4, 8]
    assert [r["prompt_tokens"] for r in json.loads((tmp_path / "b.json").read_text())["results"]] == [4, 8]


def test_this_machine_is_local_for_bench_and_fit(tiny_export):
    code, out, err = run_cli("fit", "--device", "local", "--artifact", tiny_export)
    assert code in (0, 1), err
    assert "local" in out
    code, _, err = run_cli("fit", "--device", "laptop", "--artifact", tiny_export)
    assert code == 2 and "local" in err  # the old name is refused, and the choices say the new one


def test_a_missing_package_is_one_line_naming_the_pip_command(tmp_path):
    # PyTorch hidden from the import system: export names it and the command to install it
    code = ("import sys, importlib.abc\n"
            "class Hide(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'torch':\n"
            "            raise ModuleNotFoundError(f\"No module named '{name}'\", name=name)\n"
            "sys.meta_path.insert(0, Hide())\n"
            "from slm_export.cli import main\n"
            f"sys.exit(main(['export', '--out', {str(tmp_path / 'o')!r}]))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and "torch" in lines[0] and "pip install torch==2.13.0" in lines[0], p.stderr
    assert not (tmp_path / "o").exists()


def test_missing_module_deep_in_a_command_is_named():
    from slm_export.cli import _missing_package

    try:
        try:
            raise ModuleNotFoundError("No module named 'coremltools'", name="coremltools")
        except ModuleNotFoundError as inner:
            raise RuntimeError("conversion failed") from inner
    except RuntimeError as e:
        assert _missing_package(e) == "the Python package 'coremltools' is not installed: pip install \"slm-export[coreml]\""


def test_chat_templates_render_in_a_sandbox():
    from slm_export.errors import SlmExportError
    from slm_export.text import format_chat

    assert format_chat("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}", "hi") == "<user>hi"
    hostile = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(SlmExportError, match="tried something a template may not"):
        format_chat(hostile, "hi")
    with pytest.raises(SlmExportError, match="only system and user"):
        format_chat("{{ raise_exception('only system and user') }}", "hi")


def test_progress_goes_to_stderr_and_only_for_work_that_takes_a_while(capsys, monkeypatch):
    from slm_export import progress

    monkeypatch.setattr(progress, "SHOW_AFTER_S", 0.0)
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)
    progress.set_quiet(False)
    try:
        with progress.stage("lowering"):
            time.sleep(0.3)  # the stage's line comes from a timer thread
        list(progress.steps(range(3), "layers"))
        out, err = capsys.readouterr()
        assert out == ""
        assert "lowering" in err and "layers 3/3" in err
        progress.set_quiet(True)
        with progress.stage("lowering"):
            pass
        list(progress.steps(range(3), "layers"))
        assert capsys.readouterr() == ("", "")
    finally:
        progress.set_quiet(os.environ.get("SLM_EXPORT_QUIET", "") not in ("", "0"))
    # quick work says nothing (a refused input's one line stands alone)
    monkeypatch.setattr(progress, "SHOW_AFTER_S", 5.0)
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 5.0)  # off a terminal (as here) a stage waits PLAIN_EVERY_S
    progress.set_quiet(False)
    with progress.stage("loading"):
        pass
    list(progress.steps(range(3), "layers"))
    assert capsys.readouterr() == ("", "")


def test_progress_eta_fits_steps_that_grow():
    """Steps that grow (mixed precision's later layers carry more states): the ETA fits a fixed and a
    per-unit time to the steps done and sums it over the steps left, not the mean step times the steps left."""
    from slm_export import progress

    even, grows = progress.Count("layers", 5), progress.Count("layers", 5, work=[5, 9, 13, 17, 21])
    even.done, even.times = 3, [4.0, 4.2, 4.4]
    grows.done, grows.times = 3, [4.0, 4.2, 4.4]  # 3.75 s + 0.05 s per state: 4.6 and 4.8 s to come
    assert even.left(12.6) == pytest.approx(8.4)
    assert grows.left(12.6) == pytest.approx(9.4)
    grows.times = [4.0, 3.0, 2.0]  # shrinking with size: no negative per-unit time, the mean step instead
    assert grows.left(9.0) == pytest.approx(6.0)
    with pytest.raises(ValueError, match="3 step costs for 4 steps"):
        progress.Count("layers", 4, work=[1, 2, 3])
