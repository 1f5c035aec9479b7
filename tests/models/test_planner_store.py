"""The planner's simulations stored on disk (models/planner/store.py): read back by later
processes, never trusted when unreadable, never required."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import warnings

import pytest

from densenet_efficient.models.config import densenet_bc_config
from densenet_efficient.models.planner import estimate as estimate_module
from densenet_efficient.models.planner import estimate_memory, store
from densenet_efficient.models.planner.simulate import Line, Segment, Simulation, simulate

from ..support import REPO


@pytest.fixture
def stored(tmp_path, monkeypatch):
    """Storing on, in a fresh folder; this process's in-memory cache emptied before and after."""
    monkeypatch.setenv(store.ENV, str(tmp_path / "planner"))
    estimate_module._simulation.cache_clear()
    yield tmp_path / "planner"
    estimate_module._simulation.cache_clear()


#: A simulation to store without simulating.
SIM = Simulation(Line(10, 2), 4, 4, 0, Line(0, 1), Line(0, 7), (Line(12, 9),), (Segment("denseblock1", Line(1, 1), (), ()),))


def _estimate(**kwargs):
    return estimate_memory("densenet_bc_16", batch_size=8, device="cpu", **kwargs)


def _no_simulating(*args, **kwargs):
    raise AssertionError("simulated although a stored simulation was there")


def test_a_stored_simulation_answers_without_simulating(stored, monkeypatch):
    first = _estimate()
    files = list(stored.glob("*.json"))
    assert len(files) == 1 and not list(stored.glob(".*"))  # no temporary file left
    estimate_module._simulation.cache_clear()  # as a new process would start
    monkeypatch.setattr(estimate_module, "simulate", _no_simulating)
    assert _estimate() == first
    with pytest.raises(AssertionError, match="simulated although"):  # another setting is not stored
        _estimate(mode="max_saving")


def test_a_new_process_answers_from_the_store_without_simulating(stored):
    """The point of storing: a later process runs no op on phantom tensors, whose first dispatch
    makes torch import ``torch.distributed.tensor`` (0.4 s here); neither imports torch's
    compiler stack (``torch._dynamo``, a second), which torch's fake tensors would."""
    code = (
        "import sys; from densenet_efficient.models.planner import max_batch_size; "
        "print(max_batch_size('densenet_bc_16', '1GiB', device='cpu'), "
        "'torch.distributed.tensor' in sys.modules, 'torch._dynamo' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def run() -> list[str]:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        return out.stdout.split()

    batch, dtensor, dynamo = run()
    assert (dtensor, dynamo) == ("True", "False") and list(stored.glob("*.json"))  # simulated and stored
    assert run() == [batch, "False", "False"]


@pytest.mark.parametrize(
    "text",
    [
        "",  # an empty file
        '{"persistent": [1, 2]',  # cut short
        "[]",  # JSON, not a simulation
        "\xff\xfe",  # not text
        pytest.param("[" * 100_000, id="nested"),  # deeper than json's recursion limit: RecursionError
    ],
)
def test_an_unreadable_stored_simulation_is_simulated_again_and_replaced(stored, monkeypatch, text):
    first = _estimate()
    (path,) = stored.glob("*.json")
    path.write_text(text, encoding="latin-1")
    estimate_module._simulation.cache_clear()
    assert _estimate() == first
    assert store.decode(json.loads(path.read_text())) is not None  # written whole again


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("parameters", True), ("parameters", 1.5), ("persistent", [1]), ("trace", [[1, "2"]]), ("segments", [["x"]]),
        # well-formed, but no simulation counts so: fewer than no bytes, or no moment at all
        ("parameters", -1), ("optimizer_state", -8), ("gathers", -1), ("persistent", [-5, 0]),
        ("inputs", [0, -1]), ("trace", []), ("trace", [[12, 9], [-1, 10]]),
    ],
)  # fmt: skip
def test_decode_refuses_what_is_not_a_simulation(field, value):
    data = store.encode(simulate(densenet_bc_config(16), "efficient", image_size=32))
    assert store.decode(json.loads(json.dumps(data))) == store.decode(data)
    with pytest.raises(ValueError):
        store.decode({**data, field: value})
    with pytest.raises(ValueError):
        store.decode({k: v for k, v in data.items() if k != field})


def test_storing_can_be_turned_off(stored, monkeypatch):
    monkeypatch.setenv(store.ENV, "0")
    _estimate()
    assert not stored.exists()


def test_a_folder_that_cannot_be_written_is_said_once_and_changes_no_answer(stored, monkeypatch):
    stored.parent.mkdir(parents=True, exist_ok=True)
    stored.write_text("a file where the folder would be")
    monkeypatch.setattr(store, "_warned", False)
    with pytest.warns(UserWarning, match="could not store its simulation") as said:
        first = _estimate()
    assert len(said) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per process
        _estimate(mode="max_saving")
    estimate_module._simulation.cache_clear()
    monkeypatch.setenv(store.ENV, "0")
    assert _estimate() == first
    assert stored.read_text() == "a file where the folder would be"  # not ours: left as it was


def test_the_name_changes_with_the_code_and_the_settings(monkeypatch):
    name = store.store_key("densenet_bc_16", 32)
    assert store.store_key("densenet_bc_16", 64) != name
    monkeypatch.setattr(store, "_code", lambda: "another version of the package")
    assert store.store_key("densenet_bc_16", 32) != name


def test_the_package_s_doctests_run_alone_do_not_use_the_user_s_store(tmp_path):
    """``pytest densenet_efficient/...`` (the doctests alone, which simulate) loads no tests/conftest.py:
    storing must be off there too, or the doctests read and write the user's ~/.cache."""
    (tmp_path / "probe.py").write_text(
        "import os\n\n\ndef pytest_collection_finish(session):\n"
        f"    open({str(tmp_path / 'seen')!r}, 'w').write(os.environ.get({store.ENV!r}, 'unset'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != store.ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(REPO)])
    argv = ["-p", "probe", "-p", "no:cacheprovider", "-p", "no:randomly", "--co", "-q", "densenet_efficient/models/planner/store.py"]  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "pytest", *argv], cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "seen").read_text() == "0"


def test_a_fifo_where_a_stored_simulation_would_be_is_not_waited_on(stored):
    """Opening a named pipe for reading blocks until something writes to it: never, here."""
    name = store.store_key("a setting")
    stored.mkdir(parents=True)
    path = stored / f"{name}.json"
    os.mkfifo(path)
    returned, fed = threading.Event(), []

    def feed_if_hung() -> None:  # a hung load is fed EOF after 5 s, so the test fails instead of hanging
        while not returned.wait(5):
            fed.append(True)
            with contextlib.suppress(OSError):  # no reader has it open (yet): try again
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))

    watchdog = threading.Thread(target=feed_if_hung)
    watchdog.start()
    try:
        assert store.load(name) is None
    finally:
        returned.set()
        watchdog.join()
    assert not fed, "load waited on the pipe"


def test_a_stored_file_larger_than_any_simulation_is_not_read(stored, monkeypatch):
    name = store.store_key("a setting")
    store.save(name, SIM)
    assert store.load(name) == SIM
    monkeypatch.setattr(store, "MAX_BYTES", len((stored / f"{name}.json").read_bytes()) - 1)
    assert store.load(name) is None


def test_save_writes_through_no_link_planted_at_a_temporary_s_name(stored, tmp_path):
    """A temporary named after the process and thread can be guessed: a link planted there (in a
    shared cache folder) would have the write land in the file it points to."""
    name = store.store_key("a setting")
    victim = tmp_path / "victim"
    victim.write_text("not the planner's")
    stored.mkdir(parents=True)
    (stored / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp").symlink_to(victim)
    store.save(name, SIM)
    assert victim.read_text() == "not the planner's"
    assert store.load(name) == SIM


def test_an_interrupted_save_leaves_no_temporary(stored, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.save(store.store_key("a setting"), SIM)
    assert list(stored.iterdir()) == []


@pytest.fixture
def fresh_code():
    """The code digest computed again from whatever a test patches, and again after it."""
    store._code.cache_clear()
    yield
    store._code.cache_clear()


def _package(root):
    (root / "sub").mkdir(parents=True)
    (root / "a.py").write_text("A = 1\n")
    (root / "sub" / "__init__.py").write_text("")
    return root


def test_the_code_digest_reads_the_modules_only(tmp_path):
    """An editor's lock file beside a module (Emacs: a dangling link ``.#a.py``) is no module: it
    crashed every planner call of an editable install, storing off or not."""
    clean = store._source(_package(tmp_path / "clean"))
    edited = _package(tmp_path / "edited")
    (edited / ".#a.py").symlink_to("user@host.4242:1700000000")
    (edited / "sub" / ".#__init__.py").symlink_to("user@host.4242:1700000000")
    assert store._source(edited) == clean
    (edited / "b.py").symlink_to("gone.py")  # a module that cannot be read: named, not read
    assert store._source(edited) not in (None, clean)
    (edited / "b.py").unlink()
    (edited / "a.py").write_text("A = 2\n")
    assert store._source(edited) != clean


def test_no_source_to_digest_turns_storing_off(stored, monkeypatch, fresh_code):
    """A package run from a zip or a frozen app has no .py files: a digest of nothing would name
    every version's simulations alike."""
    assert store._source(stored.parent / "empty") is None
    monkeypatch.setattr(store, "_SOURCE", None)
    assert store.store_key("a setting") is None
    store.save(None, SIM)
    assert store.load(None) is None and not stored.exists()
    _estimate()
    assert not stored.exists()


def test_a_process_names_its_simulations_by_the_code_it_imported(tmp_path, monkeypatch, fresh_code):
    """A process (a notebook, a long job) whose package files are edited after it imported them
    still runs the old code: its simulations must keep the old code's name, not take the new
    code's, which every later process would then read."""
    package = tmp_path / "densenet_efficient"
    shutil.copytree(store._PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(store, "_SOURCE", store._source(package))
    imported = store.store_key("a setting")  # the name a process that imported the copy gives
    code = (
        "import pathlib; from densenet_efficient.models.planner import store; "
        "p = pathlib.Path(store.__file__).with_name('simulate.py'); p.write_text(p.read_text() + '# edited\\n'); "
        "print(store.store_key('a setting'))"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [imported]


def test_the_name_changes_with_python_s_version(monkeypatch, fresh_code):
    name = store.store_key("densenet_bc_16", 32)
    store._code.cache_clear()
    monkeypatch.setattr(sys, "version_info", (3, 99, 0, "final", 0))
    assert store.store_key("densenet_bc_16", 32) != name


@pytest.mark.parametrize("value", ["false", "False", "off", "no", " 0 "])
def test_storing_turned_off_in_words_writes_no_folder_named_so(tmp_path, monkeypatch, value):
    """``=false`` was a folder named ``false`` in whatever folder the process ran in."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(store.ENV, value)
    store.save(store.store_key("a setting"), SIM)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_under_home_is_written_there(tmp_path, monkeypatch):
    """``~`` is not expanded where no shell runs (a Dockerfile's ENV, a .env file, systemd)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv(store.ENV, "~/planner")
    name = store.store_key("a setting")
    store.save(name, SIM)
    assert [p.name for p in tmp_path.iterdir()] == ["home"]
    assert store.load(name) == SIM and (tmp_path / "home" / "planner" / f"{name}.json").is_file()
