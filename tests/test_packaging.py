"""The wheel carries the runtime only: no test or bench servers, nothing that imports a dev-only
package; ``notifier demo`` / ``notifier bench`` where they cannot run say how to run them.

Everything is offline: the wheel is built from a copy of the checkout with
``pip wheel --no-deps --no-build-isolation`` (``setuptools`` comes with the dev extra), and
"installed" by unpacking it. Its code then runs in ``python -S`` (no ``.pth`` files, so the
checkout's editable install is not active) whose ``sys.path`` is the unpacked wheel plus this
venv's site-packages without the dev extra's distributions (symbolic links to everything
else); an import hook records any attempt to import one of them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The five the issue names, whatever the dev extra lists (their own dependencies stay).
NAMED_DEV_ONLY = {"aiosmtpd", "trustme", "fakeredis", "hypothesis", "pytest"}
# Run in the child before anything else: record imports of dev-only modules (they are not on
# the path, so they still fail as they would in a venv without the dev extra).
PRELUDE = """
import sys
BLOCKED, TRIED = set({blocked!r}), []
class _Recorder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            TRIED.append(name)
        return None
sys.meta_path.insert(0, _Recorder)
sys.path[:0] = {paths!r}
"""


def _dev_extra() -> list[str]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    dev = pyproject["project"]["optional-dependencies"]["dev"]
    return [m.group(0) for spec in dev if (m := re.match(r"[A-Za-z0-9_.-]+", spec))]


def _dev_only_entries() -> tuple[set[str], set[str]]:
    """(site-packages entries, top-level module names) of the dev extra's distributions."""
    entries, modules = set(NAMED_DEV_ONLY), set(NAMED_DEV_ONLY)
    for name in _dev_extra():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for file in dist.files or ():
            top = file.parts[0]
            if top in ("..", "__pycache__") or top.endswith(".pth"):
                continue
            entries.add(top)
            if not top.endswith((".dist-info", ".data")):
                modules.add(top.split(".")[0])
    return entries, modules


def _copy_source(dest: Path) -> Path:
    """The project without VCS, venv, build or caches, but with the ``notifier.egg-info`` an
    older build of a checkout leaves behind: its SOURCES.txt lists the test servers, and
    setuptools reads it back (as a plugin like setuptools-scm would list every tracked file).
    """
    ignore = shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
    )
    shutil.copytree(REPO, dest, ignore=ignore)
    sources = sorted(str(p.relative_to(dest)) for p in dest.glob("worker/**/*.py"))
    assert "worker/devtools/smtp_server.py" in sources
    (dest / "notifier.egg-info").mkdir()
    (dest / "notifier.egg-info" / "SOURCES.txt").write_text("\n".join(sources) + "\n")
    return dest


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    root = tmp_path_factory.mktemp("packaging")
    src = _copy_source(root / "src")
    out = root / "dist"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "-q",
            "-w",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = out.glob("notifier-*.whl")
    unpacked = root / "installed"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(unpacked)
    # this venv's site-packages minus the dev extra, as links
    site = root / "site-packages"
    site.mkdir()
    skip, _ = _dev_only_entries()
    purelib, platlib = sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]
    for lib in dict.fromkeys((purelib, platlib)):
        for entry in Path(lib).iterdir():
            name = entry.name
            if (
                name in skip
                or name.startswith(("__editable__", "notifier-"))
                or name.endswith(".pth")
                or (site / name).exists()
            ):
                continue
            (site / name).symlink_to(entry)
    yield {"src": src, "wheel": wheel, "installed": unpacked, "site": site, "root": root}


def _python(paths: Sequence[Path], code: str) -> subprocess.CompletedProcess[str]:
    _, blocked = _dev_only_entries()
    prelude = PRELUDE.format(blocked=sorted(blocked), paths=[str(p) for p in paths])
    return subprocess.run(
        [sys.executable, "-S", "-c", prelude + code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=paths[0],
    )


def _notifier(paths: Sequence[Path], *args: str) -> subprocess.CompletedProcess[str]:
    """The ``notifier`` console script (worker.cli:main) with ARGS."""
    code = (
        f"sys.argv = ['notifier', *{list(args)!r}]\nfrom worker.cli import main\nsys.exit(main())"
    )
    return _python(paths, code)


def test_the_wheel_carries_the_runtime_only(built: dict[str, Path]) -> None:
    names = zipfile.ZipFile(built["wheel"]).namelist()
    dev = [n for n in names if n.startswith(("worker/devtools/", "worker/bench/", "tests/"))]
    assert dev == [], dev
    for needed in (
        "worker/cli.py",
        "worker/service.py",
        "worker/demo.py",
        "worker/py.typed",
        "producer/__init__.py",
        "producer/py.typed",
    ):
        assert needed in names, needed
    assert any(n.startswith("worker/templates/") and n.endswith(".j2") for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert (
        "notifier = worker.cli:main" in zipfile.ZipFile(built["wheel"]).read(entry_points).decode()
    )


def test_nothing_in_the_wheel_imports_a_dev_only_package(built: dict[str, Path]) -> None:
    code = """
import importlib, json, pkgutil, worker, producer
done = []
for pkg in (worker, producer):
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
            done.append(info.name)
try:
    import worker.devtools
    devtools = worker.devtools.__file__
except ModuleNotFoundError:
    devtools = None
print(json.dumps({"imported": done, "tried": TRIED, "worker": worker.__file__,
                  "devtools": devtools}))
"""
    proc = _python([built["installed"], built["site"]], code)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["worker"].startswith(str(built["installed"]))  # the wheel, not the checkout
    assert report["devtools"] is None
    assert {"worker.cli", "worker.service", "worker.demo", "producer.client"} <= set(
        report["imported"]
    )
    assert report["tried"] == [], report["tried"]


def test_the_recorder_sees_a_dev_only_import(built: dict[str, Path]) -> None:
    """The check above can fail: the same setup records (and refuses) an import of aiosmtpd."""
    proc = _python(
        [built["installed"], built["site"]],
        "try:\n import aiosmtpd.smtp\nexcept ModuleNotFoundError:\n print('missing', TRIED)",
    )
    assert proc.stdout.strip() == "missing ['aiosmtpd']", proc.stdout + proc.stderr


@pytest.mark.parametrize("with_dev_extra", [False, True], ids=["runtime-only", "dev-extra"])
@pytest.mark.parametrize("command", ["demo", "bench"])
def test_demo_and_bench_from_the_wheel_say_to_run_them_from_a_checkout(
    built: dict[str, Path], command: str, with_dev_extra: bool
) -> None:
    paths = [built["installed"], built["site"]]
    if with_dev_extra:  # `pip install 'notifier[dev]'` from the wheel: still no test servers
        paths.append(Path(sysconfig.get_paths()["purelib"]))
    proc = _notifier(paths, command)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"notifier {command}: ")
    assert "checkout" in lines[0]
    assert f"make {command}" in lines[0]


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_demo_and_bench_in_a_checkout_without_the_dev_extra_name_it(
    built: dict[str, Path], command: str
) -> None:
    proc = _notifier([built["src"], built["site"]], command)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"notifier {command}: aiosmtpd is missing")
    assert "pip install -e '.[dev]'" in lines[0]
    assert f"make {command}" in lines[0]


def test_an_editable_install_still_imports_the_dev_tools_from_the_checkout(
    built: dict[str, Path],
) -> None:
    """What `make` installs (`pip install -e .`): the excluded packages come from the checkout."""
    editable = built["root"] / "editable"
    build = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from setuptools import build_meta; print(build_meta.build_editable({str(editable)!r}))",
        ],
        cwd=built["src"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stderr
    target = built["root"] / "editable-site"
    with zipfile.ZipFile(editable / build.stdout.strip().splitlines()[-1]) as zf:
        zf.extractall(target)
    code = f"""
import site
site.addsitedir({str(target)!r})  # runs the editable install's .pth (already first on the path)
import worker.devtools.redis_server, worker.bench.lab, worker.demo
print(worker.devtools.redis_server.__file__)
print(worker.bench.lab.__file__)
"""
    # the copy's editable finder first: the venv has one of the same name for /work/main
    proc = _python([target, Path(sysconfig.get_paths()["purelib"])], code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        str(built["src"] / "worker" / "devtools" / "redis_server.py"),
        str(built["src"] / "worker" / "bench" / "lab.py"),
    ]


def test_demo_runs_from_the_checkout() -> None:
    """`make demo` (= `notifier demo` in the editable install): the whole pipeline still runs."""
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "demo", "--events", "6"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "6 mails received by the sink; dead letters: 1 (the malformed event)" in proc.stdout
    assert "100.0% within 1 s" in proc.stdout
    # orders, fills and errors also go to the desk's webhook (i = 0 an order, i = 2 a fill)
    assert "webhook desk-hook received 2 alerts (2 expected), p50 " in proc.stdout
    assert "  sent " in proc.stdout and "to webhook desk-hook" in proc.stdout
