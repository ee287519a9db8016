"""One writer per run folder: every command that writes an output folder holds its lock
(``bench.t2i.outdir.run_lock``) for its whole run, a second process on the same folder is
refused in one line (exit 2) and touches nothing, temporary folders of a live run are never
swept, and torchrun ranks never outlive their launcher."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from t2i_helpers import one_line, snapshot

from bench import evaluate, import_pairs, make_pairs, sample, train_policy_pair, train_t2i
from bench.digits import __main__ as digits
from bench.t2i import outdir
from bench.t2i.checkpoint import atomic_write_dir, checkpoint_problem, list_checkpoints
from bench.t2i.pairs import build_pairs
from bench.t2i.prompts import DEMO_PROMPTS
from bench.t2i.tiny import tiny_backbone

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
pytestmark = pytest.mark.usefixtures("one_thread")

# another process holding OUT's lock, with temporary folders of its own (a live writer)
HOLDER = """import sys
from bench.t2i.outdir import run_lock
with run_lock(sys.argv[1]) as out:
    for name in sys.argv[2:]:
        (out / name).mkdir(parents=True)
    print("held", flush=True)
    sys.stdin.read()
"""


@contextmanager
def held_elsewhere(out: Path, *tmp_dirs: str):
    """Yield the process that holds ``out``'s lock until the block ends."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), *tmp_dirs], env=ENV,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert p.stdout.readline() == "held\n"
        yield p
    finally:
        p.kill()
        p.wait(timeout=60)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pairs")
    build_pairs(tiny_backbone("sd"), DEMO_PROMPTS[:8], out, steps=2, shard_size=4, progress=False)
    return out


def train_argv(data: Path, out: Path, *flags: str) -> list[str]:
    return ["--tiny", "--data", str(data), "--out", str(out), "--no-progress", "--batch-size",
            "2", *flags]  # fmt: skip


def command(name: str, data: Path, out: Path, tmp: Path):
    """``() -> exit code`` of command ``name`` writing into ``out``."""
    if name == "train_t2i":
        return lambda: train_t2i.main(train_argv(data, out, "--resume", "latest"))
    if name == "train_policy_pair":  # the one run of both adapters into OUT
        return lambda: train_policy_pair.main(
            train_argv(data, out, "--resume", "latest"), run=train_t2i.main
        )
    if name == "make_pairs":
        return lambda: make_pairs.main(["--tiny", "sd", "--out", str(out), "--max-prompts", "2",
                                        "--steps", "1", "--no-progress"])  # fmt: skip
    if name == "sample":
        return lambda: sample.main(["--tiny", "sd", "--out", str(out), "--max-prompts", "1",
                                    "--steps", "1", "--no-progress"])  # fmt: skip
    if name == "evaluate":
        images = tmp / "images"
        return lambda: evaluate.main(["--images", str(images), "--tiny", "--out", str(out)])
    if name == "import_pairs":
        return lambda: import_pairs.main(["--from", "ddspo", str(tmp / "no-such-dir"), "--out",
                                          str(out)])  # fmt: skip
    if name == "digits":
        return lambda: digits.main(["--out", str(out), "--preset", "smoke", "--no-progress"])
    raise AssertionError(name)


COMMANDS = [
    "train_t2i",
    "train_policy_pair",
    "make_pairs",
    "sample",
    "evaluate",
    "import_pairs",
    "digits",
]


@pytest.fixture(scope="module")
def live_run(tmp_path_factory):
    """``(out, holder)``: a run folder another process is writing (it holds the lock and
    has temporary folders of its own there)."""
    out = tmp_path_factory.mktemp("live") / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    with held_elsewhere(out, ".tmp-step-000002-1-x", "checkpoints/.tmp-x") as holder:
        yield out, holder


@pytest.mark.parametrize("name", COMMANDS)
def test_second_writer_is_refused_and_touches_nothing(data, live_run, tmp_path, capsys, name):
    out, holder = live_run
    before = snapshot(out)
    capsys.readouterr()
    prefix = "evaluate.py: " if name == "evaluate" else ""
    assert command(name, data, out, tmp_path)() == 2
    line = one_line(capsys)
    assert line == f"{prefix}error: --out {out} is in use by another run (pid {holder.pid})"
    assert snapshot(out) == before  # the live run's temporary folders too
    assert not list(out.parent.glob(".tmp-*"))


def test_digits_cache_is_shared_by_experiments_run_at_once(tmp_path, capsys, monkeypatch):
    """--out is locked for the whole run, a --cache outside it only per stage while that
    stage is written: another experiment at work in the cache does not stop this one."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    ran = []
    monkeypatch.setattr(digits, "_run", lambda a, cfg: ran.append(a.cache) or 0)
    with held_elsewhere(cache):  # the cache's own lock: no run takes it for its duration
        assert digits.main(["--out", str(out), "--cache", str(cache), "--preset", "smoke"]) == 0
    assert ran == [str(cache)]
    (tmp_path / "file").write_text("precious")
    out2 = tmp_path / "out2"
    assert digits.main(["--out", str(out2), "--cache", str(tmp_path / "file")]) == 2
    assert one_line(capsys) == f"error: --cache {tmp_path / 'file'} is a file, not a folder"
    assert (tmp_path / "file").read_text() == "precious" and not out2.exists()


def test_digits_cache_stage_is_locked_while_written(tmp_path):
    """A cache stage another experiment is writing: one line naming it, its files untouched;
    a free stage is written under its own lock and keeps no lock file; a stage inside the
    held --out takes no lock of its own."""
    from bench.digits import experiment
    from bench.digits.util import MARKER

    runner = experiment.Runner.__new__(experiment.Runner)
    cache, out = tmp_path / "cache", tmp_path / "out"

    def fn(path):
        assert (path / outdir.LOCK_FILE).is_file() == (path.parent == cache)
        (path / "x").write_text(path.name)
        return {}

    with outdir.run_lock(out), held_elsewhere(cache / "busy", ".tmp-half") as holder:
        busy = snapshot(cache / "busy")
        with pytest.raises(outdir.OutputError) as e:
            runner.stage(cache / "busy", fn, "busy")
        assert (
            str(e.value) == f"--cache {cache / 'busy'} is in use by another run (pid {holder.pid})"
        )
        assert snapshot(cache / "busy") == busy
        runner.stage(cache / "free", fn, "free")
        runner.stage(out / "seed-0", fn, "seed")
    for d in (cache / "free", out / "seed-0"):
        assert sorted(p.name for p in d.iterdir()) == [MARKER, "x"]


def test_two_trainers_on_one_out(data, tmp_path, capsys):
    """A live trainer (a process of its own) and a second one on the same --out, e.g. the
    same job restarted with --resume latest: the second is refused at once and writes
    nothing; the first trains on and, stopped by SIGTERM, exits 143 with its own config, one
    log of consecutive steps, loadable checkpoints, and no lock or temporary file left."""
    out = tmp_path / "run"
    flags = ("--method", "dpo", "--max-steps", "100000", "--ckpt-every", "1", "--keep-last",
             "2", "--log-every", "1")  # fmt: skip
    cmd = [sys.executable, str(REPO / "bench" / "train_t2i.py"), *train_argv(data, out, *flags)]
    first = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not list_checkpoints(out / "checkpoints"):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.2)
        capsys.readouterr()
        again = train_argv(data, out, *flags[:2], "--max-steps", "1", "--resume", "latest")
        assert train_t2i.main(again) == 2
        assert one_line(capsys) == f"error: --out {out} is in use by another run (pid {first.pid})"
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("interrupted at step ")
    config = json.loads((out / "config.json").read_text())
    assert (config["method"], config["max_steps"], config["resume"]) == ("dpo", 100000, None)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # one run's lines, each step once
    ckpts = list_checkpoints(out / "checkpoints")
    assert ckpts and all(checkpoint_problem(c)[1] is None for c in ckpts)
    assert not (out / "final").exists() and not (out / outdir.LOCK_FILE).exists()
    assert not list(out.glob(".tmp-*")) and not list((out / "checkpoints").glob(".tmp-*"))


def test_stale_tmp_is_swept_only_under_the_lock(data, tmp_path, capsys):
    """A killed writer's temporary folders and lock file: the next run takes the lock and
    sweeps them; without the lock nothing is swept."""
    out = tmp_path / "run"
    stale = [out / ".tmp-final-123-abc", out / "checkpoints" / ".tmp-step-000001-123-abc"]
    with held_elsewhere(out, *(str(d.relative_to(out)) for d in stale)) as holder:
        with pytest.raises(RuntimeError, match="without holding its run_lock"):
            outdir.remove_stale_tmp(out)
        holder.kill()  # kill -9: its lock file and temporary folders stay behind
        holder.wait(timeout=60)
    assert (out / outdir.LOCK_FILE).read_text() == f"{holder.pid}\n"
    assert all(d.is_dir() for d in stale)
    flags = ("--method", "sft", "--max-steps", "1", "--resume", "latest")
    assert train_t2i.main(train_argv(data, out, *flags)) == 0
    assert not any(d.exists() for d in stale)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json", "final",
                                                     "metrics.jsonl"]  # fmt: skip


def test_lock_leaves_no_trace(tmp_path, capsys):
    """The lock makes OUT if needed and removes what it made when nothing else landed there;
    an existing folder keeps its contents, without the lock file."""
    out = tmp_path / "a" / "b"
    with outdir.run_lock(out) as held:
        assert held == out and (out / outdir.LOCK_FILE).read_text() == f"{os.getpid()}\n"
        assert outdir.holds_lock(out / "checkpoints") and not outdir.holds_lock(tmp_path)
    assert not (tmp_path / "a").exists() and not outdir.holds_lock(out)
    with outdir.run_lock(out):
        (out / "x").write_text("kept")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b", "x"]
    (tmp_path / "file").write_text("precious")
    with pytest.raises(outdir.OutputError, match=f"^--cache {tmp_path / 'file'} is a file"):
        with outdir.run_lock(tmp_path / "file", "--cache"):
            pass
    assert (tmp_path / "file").read_text() == "precious"


def test_temporary_names_are_per_process(tmp_path):
    """Another writer's temporary folder next to the target is neither reused nor deleted."""
    other = tmp_path / ".tmp-final"  # the name every writer used before
    (other / "unet").mkdir(parents=True)
    atomic_write_dir(tmp_path / "final", lambda d: (d / "a").write_text("1"))
    atomic_write_dir(tmp_path / "final", lambda d: (d / "b").write_text("2"))
    assert other.is_dir() and (other / "unet").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-final", "final"]
    assert [p.name for p in (tmp_path / "final").iterdir()] == ["b"]


# ------------------------------------------------------------------------- torchrun


def start_torchrun(out: Path, data: Path, *entry: str, env=ENV) -> subprocess.Popen:
    cmd = ["timeout", "-s", "KILL", "300", sys.executable, "-m", "torch.distributed.run",
           "--standalone", "--nproc_per_node=2", *entry, str(REPO / "bench" / "train_t2i.py"),
           *train_argv(data, out, "--method", "dpo", "--max-steps", "100000", "--ckpt-every",
                       "1", "--keep-last", "2", "--log-every", "1")]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip


def ranks_training(p: subprocess.Popen, out: Path) -> tuple[psutil.Process, list[psutil.Process]]:
    """torchrun and the processes it started, once rank 0 has logged a step."""
    deadline = time.monotonic() + 240
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()[0][-3000:]
        time.sleep(0.2)
    launcher = psutil.Process(p.pid).children()[0]  # timeout -> torchrun
    return launcher, launcher.children(recursive=True)


def gone(procs: list[psutil.Process], within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        alive = [q for q in procs if q.is_running() and q.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(sys.platform != "linux", reason="the launch uses coreutils timeout")
@pytest.mark.timeout(300)
def test_kill_9_of_torchrun_ends_both_ranks(data, tmp_path):
    out = tmp_path / "run"
    p, ranks = start_torchrun(out, data), []
    try:
        launcher, children = ranks_training(p, out)
        ranks = [q for q in children if "train_t2i.py" in " ".join(q.cmdline())]
        assert len(ranks) == 2, [q.cmdline() for q in children]
        launcher.kill()
        assert gone(ranks, within=20), [q.cmdline() for q in ranks if q.is_running()]
        before = snapshot(out)
        time.sleep(2)
        assert snapshot(out) == before  # nothing written after the kill
    finally:
        stop(p, ranks)


def stop(p: subprocess.Popen, procs: list[psutil.Process]) -> None:
    """Kill what is left of a torchrun launch (its ranks run in sessions of their own)."""
    for q in procs:
        with contextlib.suppress(psutil.Error):
            q.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
    p.communicate(timeout=60)


WRAPPER = """import os, signal, subprocess, sys
signal.signal(signal.SIGTERM, lambda *a: None)  # the rank below gets torchrun's SIGTERM
rc = subprocess.call([sys.executable, *sys.argv[1:]])
open(os.path.join(os.environ["RC_DIR"], os.environ["RANK"]), "w").write(str(rc))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_to_torchrun(data, tmp_path):
    """torchrun passes SIGTERM to every rank: each stops with its one line and exit 143
    (recorded by a wrapper between torchrun and the rank); torchrun itself exits 1."""
    out, rcs = tmp_path / "run", tmp_path / "rc"
    rcs.mkdir()
    (tmp_path / "wrap.py").write_text(WRAPPER)
    p = start_torchrun(out, data, str(tmp_path / "wrap.py"), env={**ENV, "RC_DIR": str(rcs)})
    ranks = []
    try:
        launcher, ranks = ranks_training(p, out)
        launcher.terminate()
        output = p.communicate(timeout=120)[0]
    finally:
        stop(p, ranks)
    assert p.returncode == 1, output[-3000:]
    assert "SignalException" in output and "interrupted at step " in output
    assert {f.name: f.read_text() for f in rcs.iterdir()} == {"0": "143", "1": "143"}
    assert all(checkpoint_problem(c)[1] is None for c in list_checkpoints(out / "checkpoints"))
    assert not (out / outdir.LOCK_FILE).exists() and not list(out.rglob(".tmp-*"))


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc")
def test_umask_is_read_without_setting_it(tmp_path, monkeypatch):
    """Temporary files and folders get the umask's mode; the umask is never set to 0 (another
    thread would create world-writable files meanwhile), and no os.fchmod (not on Windows)."""
    old = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda *a: pytest.fail("os.umask called"))
        monkeypatch.delattr(os, "fchmod")
        tmp = outdir.tmp_path_for(tmp_path / "f")
        stage = outdir.stage_dir(tmp_path / "d")
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert tmp.name.startswith(".tmp-f-") and tmp.stat().st_mode & 0o777 == 0o640
    assert stage.name.startswith(".tmp-d-") and stage.stat().st_mode & 0o777 == 0o750


def test_lock_file_removed_under_a_waiter_is_not_a_second_lock(tmp_path, monkeypatch):
    """B opens OUT/.lock, A removes it and ends, B locks the removed file, C makes a new one:
    B and C must not both hold OUT (filelock checks the link count; pyproject's floor)."""
    out = tmp_path / "out"
    a = contextlib.ExitStack()
    a.enter_context(outdir.run_lock(out))
    real_open = os.open

    def open_then_a_ends(path, *args, **kw):
        fd = real_open(path, *args, **kw)
        if str(path) == str(out / outdir.LOCK_FILE) and a._exit_callbacks:
            a.close()  # A unlinks .lock and releases it between B's open and B's lock
        return fd

    monkeypatch.setattr(os, "open", open_then_a_ends)
    b = contextlib.ExitStack()
    try:
        b.enter_context(outdir.run_lock(out))
    except outdir.OutputError as e:  # refused: acceptable, nobody else holds a dead lock
        assert str(e).startswith(f"--out {out} is in use by another run")
    else:
        monkeypatch.undo()
        with pytest.raises(outdir.OutputError, match="is in use by another run"):
            with outdir.run_lock(out):  # C
                pass
    finally:
        b.close()
    monkeypatch.undo()
    with outdir.run_lock(out):
        pass
    assert not out.exists()


def test_dataset_and_digits_temporary_names_are_per_process(data, tmp_path):
    """finalize (metadata.jsonl, info.json) and the digits helpers write through per-process
    ``.tmp-`` names: another writer's temporary file is neither replaced nor moved, and a
    killed writer's leftovers are ones remove_stale_tmp sweeps."""
    from bench.digits.util import atomic_dir, write_json
    from bench.t2i.pairdata import finalize

    d = tmp_path / "pairs"
    shutil.copytree(data, d)
    info = json.loads((d / "info.json").read_text())
    others = {n: f"another writer's {n}" for n in (".tmp-metadata.jsonl", ".tmp-info.json")}
    for name, text in others.items():
        (d / name).write_text(text)
    meta = (d / "metadata.jsonl").read_text()
    finalize(
        d, {k: v for k, v in info.items() if k not in ("format", "version")}, info["num_shards"]
    )
    assert {n: (d / n).read_text() for n in others} == others
    assert (d / "metadata.jsonl").read_text() == meta
    assert json.loads((d / "info.json").read_text()) == info

    tmp_path = tmp_path / "digits"
    tmp_path.mkdir()
    (tmp_path / "s.json.tmp").write_text("other")
    (tmp_path / "stage.tmp").mkdir()
    write_json(tmp_path / "s.json", {"a": 1})
    with atomic_dir(tmp_path / "stage") as tmp:
        assert tmp.name.startswith(".tmp-stage-") and tmp.parent == tmp_path
        (tmp / "f").write_text("1")
    assert (tmp_path / "s.json.tmp").read_text() == "other" and (tmp_path / "stage.tmp").is_dir()
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": 1}
    assert [p.name for p in (tmp_path / "stage").iterdir()] == ["f"]
    with pytest.raises(KeyError), atomic_dir(tmp_path / "stage2") as tmp:
        raise KeyError
    assert not tmp.exists() and not (tmp_path / "stage2").exists()
