"""Issue 13 measurement: every fault and bad input we know of, tried through the product's own commands.

Each case runs `superweights ...` as a user would (a subprocess, real Ray, real MLflow in a temporary SQLite
store, a real uvicorn server on 127.0.0.1) and records what the user sees (the `superweights:` line), the exit
code, the MLflow status and whether anything was lost. The table goes to BENCHMARKS.md ("reliability");
`--no-write` only prints it. About 4-6 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import write_section  # noqa: E402

SW = str(Path(sys.executable).with_name("superweights"))
TINY = ["--set", 'ensemble.members=["wrn-10-1","wrn-10-2"]', "--set", "data.train_per_class=60",
        "--set", "train.batch_size=100", "--set", "train.lr=0.005"]
ENV = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}


class Case:
    def __init__(self, fault: str):
        self.fault, self.seen, self.code, self.status, self.kept, self.ok = fault, "", None, "", "", False

    def row(self) -> str:
        seen = self.seen.replace("|", "\\|")
        return f"| {self.fault} | {seen} | {self.code} | {self.status or '-'} | {self.kept} | {'yes' if self.ok else 'NO'} |"


def _line(text: str) -> str:
    ours = [ln for ln in text.splitlines() if ln.startswith("superweights:")]
    return ours[-1] if ours else (text.strip().splitlines() or [""])[-1]


def _cli(args: list[str], work: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([SW, *args], cwd=work, capture_output=True, text=True, timeout=timeout, env=ENV)


class Bench:
    def __init__(self, work: Path):
        self.work = work
        self.uri = "sqlite:///" + str(work / "mlflow.db")
        from mlflow import MlflowClient

        self.client = MlflowClient(self.uri)
        self.client.search_experiments()  # migrate the fresh store before anything is timed or killed

    def train_args(self, name: str, epochs: int, *extra: str) -> list[str]:
        return ["train", *TINY, "--set", f"train.epochs={epochs}", "--name", name, "--storage-path",
                str(self.work / "ray"), "--out", str(self.work / "out" / name), "--tracking-uri", self.uri, *extra]

    def status(self, name: str) -> tuple[str, dict]:
        exp = self.client.get_experiment_by_name("superweights")
        runs = self.client.search_runs([exp.experiment_id], f"tags.`superweights.run_name` = '{name}'") if exp else []
        return (runs[0].info.status, runs[0].data.tags) if runs else ("(no run)", {})

    def epochs_logged(self, name: str) -> list[int]:
        exp = self.client.get_experiment_by_name("superweights")
        (run,) = self.client.search_runs([exp.experiment_id], f"tags.`superweights.run_name` = '{name}'")
        return sorted(m.step for m in self.client.get_metric_history(run.info.run_id, "train_loss"))

    def refused(self, fault: str, args: list[str], expect: str, *, no_ray: bool = True) -> Case:
        c = Case(fault)
        r = _cli(args, self.work)
        c.code, c.seen = r.returncode, _line(r.stderr)
        c.kept = "nothing started" if "starting a local Ray" not in r.stdout else "Ray started first"
        c.ok = r.returncode == 2 and expect in c.seen and r.stderr.count("\n") == 1 and (
            not no_ray or "starting a local Ray" not in r.stdout)
        return c

    # -- training faults -----------------------------------------------------------------------------
    def diverged(self) -> Case:
        c = Case("diverged run (`train.lr=1e6`, 2 workers)")
        r = _cli(self.train_args("diverged", 3, "--set", "train.lr=1e6"), self.work)
        c.code, c.seen = r.returncode, _line(r.stderr)
        c.status, tags = self.status("diverged")
        no_model = not (self.work / "out" / "diverged").exists()
        c.kept = "no model files written" if no_model else "MODEL FILES WRITTEN"
        c.ok = r.returncode == 2 and c.status == "FAILED" and no_model and "superweights.failure" in tags
        return c

    def worker_crash(self) -> Case:
        c = Case("a worker raises mid-epoch (`--crash-at-epoch 2`, 2 workers)")
        r = _cli(self.train_args("crash", 4, "--crash-at-epoch", "2"), self.work)
        c.code, c.status = r.returncode, self.status("crash")[0]
        resumed = [ln for ln in r.stdout.splitlines() if "resumed from" in ln]
        c.seen = resumed[0].split("/")[-1] if resumed else _line(r.stderr)
        steps = self.epochs_logged("crash")
        c.kept = f"epochs in MLflow {steps}"
        c.ok = r.returncode == 0 and c.status == "FINISHED" and steps == [1, 2, 3, 4] and bool(resumed)
        return c

    def _interrupted(self, name: str, sig: int, epochs: int) -> tuple[subprocess.Popen, str]:
        log = self.work / f"{name}.log"
        proc = subprocess.Popen([SW, *self.train_args(name, epochs)], cwd=self.work, env=ENV, text=True,
                                stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        want = self.work / "ray" / name / "checkpoint_epoch_0003" / "train_state.json"
        deadline = time.monotonic() + 240
        while not want.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if proc.poll() is None:  # (a run that ended early shows as such in its case's row)
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return proc, log.read_text()

    def ctrl_c(self) -> Case:
        c = Case("Ctrl-C (SIGINT) during a 2-worker run, then the same command again")
        proc, log = self._interrupted("ctrl-c", signal.SIGINT, 8)
        c.code, c.seen = proc.returncode, _line(log)
        first = self.status("ctrl-c")[0]
        r = _cli(self.train_args("ctrl-c", 8), self.work)
        resumed = [ln for ln in r.stdout.splitlines() if "resumed from" in ln]
        steps = self.epochs_logged("ctrl-c")
        c.status = f"{first}, then {self.status('ctrl-c')[0]}"
        c.kept = (f"rerun {'r' + resumed[0].split(' r', 1)[-1].split('/')[-1] if resumed else 'did NOT resume'}; "
                  f"epochs in MLflow {steps}")
        c.ok = (proc.returncode == 130 and first == "KILLED" and r.returncode == 0 and steps == list(range(1, 9))
                and bool(resumed))
        return c

    def sigterm(self) -> Case:
        c = Case("SIGTERM (`kill`, `ray job stop`) during a 2-worker run")
        proc, log = self._interrupted("sigterm", signal.SIGTERM, 8)
        c.code, c.seen = proc.returncode, _line(log)
        c.status = self.status("sigterm")[0]
        c.kept = "checkpoints kept" if list((self.work / "ray" / "sigterm").glob("checkpoint_epoch_*")) else "none"
        c.ok = proc.returncode == 130 and c.status == "KILLED" and "rerun with --name sigterm" in c.seen
        return c

    def sigkill_driver(self) -> Case:
        c = Case("driver killed with SIGKILL mid-run, then any other `train`")
        proc, _ = self._interrupted("sigkill", signal.SIGKILL, 30)
        before = self.status("sigkill")[0]
        r = _cli(self.train_args("after-sigkill", 1, "--workers", "0"), self.work)
        after, tags = self.status("sigkill")
        c.code = proc.returncode
        c.seen = next((ln for ln in r.stdout.splitlines() if ln.startswith("marked MLflow run")), "(nothing)")
        c.status = f"{before}, then {after}"
        c.kept = "checkpoints kept" if list((self.work / "ray" / "sigkill").glob("checkpoint_epoch_*")) else "none"
        c.ok = before == "RUNNING" and after == "FAILED" and "superweights.failure" in tags
        return c

    # -- data ------------------------------------------------------------------------------------------
    def planted_pickle(self) -> Case:
        class Payload:
            def __reduce__(self):
                return os.system, (f"touch {self.marker}",)

        root = self.work / "planted" / "cifar-10-batches-py"
        root.mkdir(parents=True)
        Payload.marker = self.work / "PWNED"
        for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
            (root / f).write_bytes(pickle.dumps(Payload()))
        c = self.refused("planted pickle in a CIFAR batch file",
                         self.train_args("planted", 1, "--set", 'data.name="cifar10"', "--set",
                                         f'data.root="{root.parent}"', "--workers", "0"), "data_batch_1")
        ran = Payload.marker.exists()
        c.kept = "the command did not run" if not ran else "THE COMMAND RAN"
        c.ok = c.ok and not ran
        return c

    def one_class(self) -> Case:
        root = self.work / "oneclass"
        for split in ("train", "val"):
            (root / split / "cat").mkdir(parents=True)
            from PIL import Image

            for i in range(4):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / split / "cat" / f"{i}.png")
        return self.refused("image folder with one class", self.train_args(
            "oneclass", 1, "--set", 'data.name="imagefolder"', "--set", f'data.root="{root}"', "--workers", "0"),
            "class")

    # -- checkpoints and serving ---------------------------------------------------------------------
    def model(self) -> Path:
        r = _cli(self.train_args("served", 2, "--workers", "0"), self.work)
        assert r.returncode == 0, r.stderr
        return self.work / "out" / "served"

    def edited_plan(self, model: Path) -> Case:
        bad = self.work / "edited"
        shutil.copytree(model, bad)
        plan = json.loads((bad / "plan.json").read_text())
        plan["bank"]["budget"] = int(plan["bank"]["budget"]) + 1000
        (bad / "plan.json").write_text(json.dumps(plan))
        c = self.refused("`plan.json` budget edited, then `evaluate`", ["evaluate", str(bad), "--out",
                                                                        str(self.work / "ev")], "plan")
        return c

    def nan_weights(self, model: Path) -> Case:
        from safetensors.torch import load_file, save_file

        bad = self.work / "nan"
        shutil.copytree(model, bad)
        state = load_file(str(bad / "weights.safetensors"))
        first = next(k for k, t in state.items() if t.is_floating_point())
        state[first] = state[first].clone().fill_(float("nan"))
        save_file(state, str(bad / "weights.safetensors"))
        return self.refused("NaN in the weights, then `serve`", ["serve", str(bad), "--port", "0"], "non-finite")

    def server(self, model: Path) -> list[Case]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([SW, "serve", str(model), "--port", str(port), "--no-access-log"], cwd=self.work,
                                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    urllib.request.urlopen(base + "/health", timeout=2).read()
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError("server did not start") from None
                    time.sleep(0.3)
            info = json.loads(urllib.request.urlopen(base + "/model", timeout=5).read())
            c1 = Case("`GET /model`")
            c1.code, c1.seen = 200, "names and sha256 hashes of the files"
            c1.ok = str(model) not in json.dumps(info) and str(self.work) not in json.dumps(info)
            c1.kept = "no paths" if c1.ok else "PATHS SHOWN"
            cases = [c1]
            for fault, body, ctype, want in (
                    ("`/predict` with a text/plain body", b"hello", "text/plain", 415),
                    ("`/predict` with a negative FLOPs budget", json.dumps(
                        {"inputs": [[[[0.0] * 8] * 8]], "budget": {"flops": -1}}).encode(), "application/json", 422),
                    ("`/predict` with NaN inputs", b'{"inputs": [[[[NaN]]]]}', "application/json", 422)):
                c = Case(fault)
                req = urllib.request.Request(base + "/predict", data=body, headers={"Content-Type": ctype})
                try:
                    urllib.request.urlopen(req, timeout=10)
                    c.code = 200
                except urllib.error.HTTPError as e:
                    c.code = e.code
                    c.seen = json.loads(e.read()).get("detail", "")
                    c.seen = c.seen if isinstance(c.seen, str) else json.dumps(c.seen)[:120]
                c.seen = c.seen[:140]
                c.kept, c.ok = "server keeps serving", c.code == want
                cases.append(c)
            return cases
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, runs, MLflow store)")
    args = p.parse_args(argv)
    began = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="sw-reliability-")
    print(f"work folder: {tmp}", flush=True)
    try:
        b = Bench(Path(tmp))
        cases = [
            b.refused("negative learning rate (`train.lr=-0.1`)", b.train_args("neg-lr", 1, "--set", "train.lr=-0.1"),
                      "train.lr"),
            b.refused("budget that cannot fit memory (`bank.budget=1e12`)",
                      b.train_args("huge", 1, "--set", "bank.budget=1000000000000"), "GB to train"),
            b.refused("`plan` of the same budget", ["plan", "--set", "bank.budget=1000000000000"], "GB to train"),
            b.refused("`--device tpu`", b.train_args("tpu", 1, "--device", "tpu"), "tpu"),
            b.planted_pickle(), b.one_class(), b.diverged(), b.worker_crash(), b.ctrl_c(), b.sigterm(),
            b.sigkill_driver(),
        ]
        model = b.model()
        cases += [b.edited_plan(model), b.nan_weights(model), *b.server(model)]
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - began
    lines = ["## Reliability: faults and bad inputs through the product's commands (bench/bench_reliability.py)", "",
             f"`python bench/bench_reliability.py` ({len(cases)} cases, {seconds:.0f} s on this machine). Each case "
             "runs `superweights ...` as a user would (real Ray, MLflow in SQLite, uvicorn on 127.0.0.1).", "",
             "| fault or input | what the user sees | exit / HTTP | MLflow | nothing lost | as designed |",
             "|---|---|---|---|---|---|", *[c.row() for c in cases]]
    print("\n".join(lines))
    if not args.no_write:
        write_section("reliability", "\n".join(lines))
    return 0 if all(c.ok for c in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
