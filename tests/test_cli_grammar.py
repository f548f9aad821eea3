"""The CLI grammar (docs/DESIGN.md "CLI grammar"), checked on every command's click parameters:
one output spelling (-o/--output), --json FILE|-, --device auto, one meaning per short flag,
closed choices that --help lists and TAB completes to names, and help texts without raw types."""
import pytest
import typer.main
from typer import _click
from typer.testing import CliRunner

from pllcli.cli.app import app

GROUP = typer.main.get_command(app)
ROOT_CTX = _click.Context(GROUP, info_name="pllcli")
COMMANDS = GROUP.list_commands(ROOT_CTX)

# Options whose values are a closed set of names (or NAME[:k=v] with a closed set of NAMEs):
# --help lists them and TAB offers the names, not files.
CLOSED = {"--model", "--objective", "--sampler", "--preset", "--when-who", "--optimizer", "--schedule",
          "--lr-schedule", "--frontend", "--dtype", "--weights", "--numbers", "--size", "--format",
          "--who-loss", "--when-pooling", "--pooling", "--who-sampler", "--task"}

# Commands whose main product is a file or folder: it is named by -o/--output.
WRITERS = {"featurize", "merge", "build-candidates", "pretrain", "train", "pseudo-label", "predict", "export",
           "demo"}


def _params(name):
    cmd = GROUP.get_command(ROOT_CTX, name)
    ctx = _click.Context(cmd, info_name=name, parent=ROOT_CTX)
    return ctx, [p for p in cmd.get_params(ctx) if not p.hidden]


def _options(name):
    ctx, params = _params(name)
    return ctx, [p for p in params if p.param_type_name == "option"]


def _long(p):
    return next((o for o in p.opts if o.startswith("--")), p.opts[0])


@pytest.mark.parametrize("name", COMMANDS)
def test_output_is_dash_o_output(name):
    """The one output is -o/--output; --out/--outdir and a positional OUTPUT survive only hidden."""
    _, params = _params(name)
    opts = [p for p in params if p.param_type_name == "option"]
    bad = [p.opts for p in opts if ("-o" in p.opts) != ("--output" in p.opts)
           or {"--out", "--outdir", "--output-dir"} & set(p.opts)]
    bad += [f"positional {p.name.upper()}" for p in params
            if p.param_type_name == "argument" and p.name in ("out", "output", "outdir", "dir")]
    if name in WRITERS and not any("--output" in p.opts for p in opts):
        bad.append("no -o/--output")
    assert not bad, f"{name}: output spelled {bad}; use -o/--output (old spellings hidden)"


@pytest.mark.parametrize("name", COMMANDS)
def test_help_shows_no_raw_types(name):
    """No `<bool>` on flags and no `list[...]` type names (use a metavar)."""
    r = CliRunner().invoke(app, [name, "-h"], terminal_width=200)
    assert r.exit_code == 0, r.output
    leaks = [ln.strip() for ln in r.output.splitlines() if "<bool>" in ln or "list[" in ln]
    assert not leaks, f"{name} -h shows raw types: {leaks}"


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_and_argument_has_help(name):
    _, params = _params(name)
    missing = [p.opts for p in params if not (p.help or "").strip()]
    assert not missing, f"{name}: no help for {missing}"


@pytest.mark.parametrize("name", COMMANDS)
def test_device_defaults_to_auto(name):
    _, opts = _options(name)
    for p in opts:
        if "--device" in p.opts:
            assert str(p.default) == "auto", f"{name} --device defaults to {p.default!r}"


@pytest.mark.parametrize("name", COMMANDS)
def test_json_takes_a_file_or_dash(name):
    _, opts = _options(name)
    for p in opts:
        if "--json" in p.opts:
            assert not p.is_flag, f"{name}: --json is a flag; it takes FILE ('-' = stdout)"


@pytest.mark.parametrize("name", COMMANDS)
def test_restrict_candidates_takes_a_label_store(name):
    _, opts = _options(name)
    for p in opts:
        if "--restrict-candidates" in p.opts:
            assert not p.is_flag, f"{name}: --restrict-candidates is a flag; it takes a label store PATH"


def test_short_flags_mean_one_thing_everywhere():
    meaning: dict[str, set[str]] = {}
    for name in COMMANDS:
        for p in _options(name)[1]:
            for o in p.opts + p.secondary_opts:
                if len(o) == 2 and o != "-h":
                    meaning.setdefault(o, set()).add(_long(p))
    clashes = {k: sorted(v) for k, v in meaning.items() if len(v) > 1}
    assert not clashes, f"short flags with several meanings: {clashes}"
    assert "--predictions" not in meaning.get("-p", set())


@pytest.mark.parametrize("name", COMMANDS)
def test_closed_choices_complete_to_names(name):
    """Closed values are typer Enums (or NAME[:k=v] with a completer): TAB offers names."""
    ctx, opts = _options(name)
    for p in opts:
        if _long(p) in CLOSED and not p.is_flag:
            got = [c.value for c in p.shell_complete(ctx, "") if c.type == "plain"]
            assert got, f"{name} {_long(p)}: TAB offers no names (make it an Enum or give it a completer)"

