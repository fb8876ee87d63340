"""Serving benchmark (issue 8): a real `superweights serve` (uvicorn, a subprocess on a loopback port; with
--ray also Ray Serve on a private local cluster) under CLIENTS concurrent clients for DURATION seconds per
budget kind (none, a mid-schedule FLOPs budget, 5 ms and 20 ms deadlines, and the per-input early exit of
issue 15: a mid-range `mean_flops` budget and `confidence` 0.9).

Reports client latency p50/p99, throughput, errors (must be 0), FLOPs budget violations (must be 0), the
server-reported elapsed time and, for deadlines of 20 ms and more, checks p99 elapsed <= deadline + 5 ms.
Then the server overhead at p50 for every budget kind (issue 15 item 6: <= 1.5 ms; deadlines of 20 ms and of
1000 ms, which every step fits: at 5 ms the server's conservative step estimates run fewer steps than a direct
call would, by design, so the two would not do the same work): one request in flight,
SEQUENTIAL rounds, each round one HTTP round trip with a minimal keep-alive client (`http.client`), one with
httpx, one to a trivial ASGI app on the same uvicorn (the floor: loopback, uvicorn, client; it answers the
same bytes the server does) and one direct `AnytimePredictor.predict` call on the same input and budget, the
order rotated every round so machine noise and cache state hit all four alike. Overhead = p50 of the round
trip - p50 of the direct call; the steps columns show that both sides did the same work. httpx adds ~1 ms per
request of its own on a busy 2-core machine (its p50 minus http.client's), which is the client's cost, not
the server's: its column is there to compare with measurements made with it before. The load stops by itself (every client stops sending at the deadline and
waits at most the request timeout). Exit code 1 when a check fails (the overhead target is reported, not a
check). `--write` updates BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anytime.budget import KINDS, UNLIMITED  # noqa: E402
from anytime.predictor import AnytimePredictor  # noqa: E402
from anytime.serving_predictor import LAYOUTS, ServingPredictor  # noqa: E402
from anytime.store import load_anytime  # noqa: E402
from bench.common import ROOT, write_section  # noqa: E402

DEADLINE_SLACK_MS = 5.0
CHECKED_DEADLINE_MS = 20.0
OVERHEAD_TARGET_MS = 1.5  # issue 15 item 6
WARMUP_ROUNDS = 20

# The floor: a trivial ASGI app on uvicorn with the server's settings (httptools/uvloop when installed, no
# access log) that reads the body and answers fixed bytes (argv[2]: a real response of the server).
FLOOR_APP = r"""
import sys
import uvicorn
BODY = open(sys.argv[2], "rb").read()
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]
async def app(scope, receive, send):
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=False, log_level="warning", lifespan="off")
"""


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def make_checkpoint(members: str, out: Path) -> Path:
    from anytime.record import finish_checkpoint
    from ensemble.config import load_config
    from ensemble.loop import fit

    fit(load_config(None, [f"ensemble.members={members}", 'ensemble.exits="all"', "train.epochs=1",
                           "data.train_per_class=20"]), out_dir=out, progress=False, log=lambda s: None,
        finish=finish_checkpoint)
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_uvicorn(ckpt: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """`python -m ray_jobs.serve` in a subprocess (its own GIL); output discarded so no pipe can fill up."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ray_jobs.serve", str(ckpt), "--port", str(port),
                             "--no-access-log", *extra], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def start_ray(ckpt: Path, port: int):
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # private loopback cluster
    os.environ.pop("RAY_ADDRESS", None)
    import ray
    from ray import serve

    from ray_jobs.serve import deployment

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(deployment(str(ckpt), replicas=1, max_ongoing_requests=16), name="bench", route_prefix="/")

    def stop():
        serve.shutdown()
        ray.shutdown()

    return stop


def server_layout(url: str, images: int) -> str:
    """The conv-weight layout the server runs a batch of `images` in (`GET /model`, measured at its start-up)."""
    import httpx

    by_batch = httpx.get(url + "/model", timeout=10).json()["memory_format"]["by_batch_size"]
    return by_batch.get(str(ServingPredictor.bucket(images))) or by_batch[max(by_batch, key=int)]


def wait_healthy(url: str, timeout: float = 180) -> None:
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not become healthy in {timeout:.0f}s")


async def load(url: str, bodies: list[bytes], budget: dict | None, clients: int, duration: float,
               full_flops: float, timeout: float = 10.0) -> dict:
    import httpx

    lat, elapsed, steps, batch, met = [], [], [], [], []
    errors = violations = 0
    stop_at = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"content-type": "application/json"}

    async def client(c: httpx.AsyncClient, i: int):
        nonlocal errors, violations
        k = i
        while time.perf_counter() < stop_at:
            k += clients
            t = time.perf_counter()
            try:
                r = await c.post("/predict", content=bodies[k % len(bodies)], headers=headers)
                dt = (time.perf_counter() - t) * 1e3
                if r.status_code != 200:
                    errors += 1
                    continue
                out = r.json()
            except (httpx.HTTPError, ValueError):
                errors += 1
                continue
            lat.append(dt)
            elapsed.append(out["elapsed_ms"])
            steps.append(statistics.mean(out["image_steps"]))
            batch.append(out["batch_images"])
            if budget and "flops" in budget and out["flops"] > budget["flops"]:
                violations += 1
            if max(out["image_flops"]) > full_flops:  # no image ever above the full schedule
                violations += 1
            if out["deadline_met"] is not None:
                met.append(out["deadline_met"])

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as c:
        await asyncio.gather(*[client(c, i) for i in range(clients)])
    wall = time.perf_counter() - start
    return {"requests": len(lat) + errors, "rps": len(lat) / wall, "p50": pct(lat, 50), "p99": pct(lat, 99),
            "elapsed_p50": pct(elapsed, 50), "elapsed_p99": pct(elapsed, 99), "errors": errors,
            "violations": violations, "met": (sum(met) / len(met)) if met else None,
            "steps": statistics.mean(steps) if steps else 0.0, "batch": statistics.mean(batch) if batch else 0.0}


def typed(budget: dict | None):
    """The `anytime.budget.Budget` a request's budget object becomes (as the server parses it)."""
    if budget is None:
        return UNLIMITED
    (key, value), = budget.items()
    return KINDS[key].requested(float(value))


class LeanClient:
    """One keep-alive HTTP/1.1 connection with the standard library: a request costs the client little, so a
    round trip measures loopback + server, not the client library."""

    def __init__(self, url: str):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=10)

    def post(self, body: bytes) -> bytes:
        self.conn.request("POST", "/predict", body=body, headers={"content-type": "application/json"})
        r = self.conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {data[:300]!r}")
        return data

    def close(self) -> None:
        self.conn.close()


def start_floor(response: bytes, folder: Path) -> tuple[subprocess.Popen, str]:
    (folder / "floor-body.json").write_bytes(response)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", FLOOR_APP, str(port), str(folder / "floor-body.json")],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 60
    while True:
        try:
            LeanClient(url).post(b"{}")
            return proc, url
        except OSError:
            if time.monotonic() > end or proc.poll() is not None:
                raise SystemExit("the floor app did not start") from None
            time.sleep(0.1)


def overhead_rounds(url: str, floor_url: str, pred: AnytimePredictor, x: torch.Tensor, budget: dict | None,
                    rounds: int) -> dict:
    """Per round: lean HTTP, httpx HTTP, floor and direct call, in an order rotated every round; p50s and the
    mean steps per image each side ran (read from the answers after the timed calls)."""
    import httpx

    body = json.dumps({"inputs": x.tolist(), "budget": budget}).encode()
    headers = {"content-type": "application/json"}
    b = typed(budget)
    lean, floor = LeanClient(url), LeanClient(floor_url)
    hx = httpx.Client(base_url=url, timeout=10)

    def via_httpx():
        r = hx.post("/predict", content=body, headers=headers)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")

    calls = {"http": lambda: lean.post(body), "httpx": via_httpx, "floor": lambda: floor.post(body),
             "direct": lambda: pred.predict(x, budget=b)}
    times: dict[str, list[float]] = {k: [] for k in calls}
    steps: dict[str, list[float]] = {"http": [], "direct": []}
    names = list(calls)
    try:
        for i in range(WARMUP_ROUNDS + rounds):
            shift = i % len(names)
            for k in names[shift:] + names[:shift]:
                t = time.perf_counter()
                out = calls[k]()
                dt = (time.perf_counter() - t) * 1e3
                if i < WARMUP_ROUNDS:
                    continue
                times[k].append(dt)
                if k == "http":
                    steps[k].append(statistics.mean(json.loads(out)["image_steps"]))
                elif k == "direct":
                    steps[k].append(statistics.mean(out.image_steps))
    finally:
        lean.close()
        floor.close()
        hx.close()
    p50 = {k: statistics.median(v) for k, v in times.items()}
    return {**p50, "steps_http": statistics.mean(steps["http"]), "steps_direct": statistics.mean(steps["direct"])}


def overhead_kinds(kinds: list[tuple[str, dict | None]]) -> list[tuple[str, dict | None]]:
    """The budget kinds of the overhead table: the load test's, with the deadlines the server's conservative
    estimates cut short by design (5 ms) replaced by one that every step fits, so both sides do the same work."""
    out = [(label, b) for label, b in kinds if not (b and b.get("ms", CHECKED_DEADLINE_MS) < CHECKED_DEADLINE_MS)]
    at = next(i for i, (_, b) in enumerate(out) if b and "ms" in b)
    return out[:at + 1] + [("ms 1000 (every step fits)", {"ms": 1000.0})] + out[at + 1:]


def bench_server(name: str, url: str, kinds: list[tuple[str, dict | None]], inputs: list[torch.Tensor],
                 args, pred: AnytimePredictor, tmp: str) -> tuple[list[str], list[str], bool, list[bool | None]]:
    rows, over, ok, targets = [], [], True, []
    full = pred.cumulative_flops[-1]
    for label, budget in ([] if args.skip_load else kinds):
        bodies = [json.dumps({"inputs": x.tolist(), "budget": budget}).encode() for x in inputs]
        asyncio.run(load(url, bodies, budget, args.clients, min(1.0, args.duration), full))  # warm-up
        r = asyncio.run(load(url, bodies, budget, args.clients, args.duration, full))
        checks = []
        if r["errors"]:
            checks.append("errors")
        if r["violations"]:
            checks.append("FLOPs over budget")
        if budget and budget.get("ms", 0) >= CHECKED_DEADLINE_MS and r["elapsed_p99"] > budget["ms"] + DEADLINE_SLACK_MS:
            checks.append(f"p99 elapsed > {budget['ms']:g} + {DEADLINE_SLACK_MS:g} ms")
        ok &= not checks
        met = "-" if r["met"] is None else f"{100 * r['met']:.1f}%"
        rows.append(f"| {name} | {label} | {r['requests']} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | "
                    f"{r['elapsed_p50']:.2f} / {r['elapsed_p99']:.2f} | {met} | {r['steps']:.2f} | {r['batch']:.2f} | "
                    f"{r['errors']} | {r['violations']} | {'ok' if not checks else 'FAIL: ' + ', '.join(checks)} |")
        print(rows[-1], flush=True)
    floor_proc = None
    try:
        x = inputs[0]
        sample = LeanClient(url)
        try:  # the floor answers the bytes the server answers to the same request
            response = sample.post(json.dumps({"inputs": x.tolist(), "budget": None}).encode())
        finally:
            sample.close()
        floor_proc, floor_url = start_floor(response, Path(tmp))
        layout = server_layout(url, len(x))
        pred.model.to(memory_format=LAYOUTS[layout])  # the direct call does the server's work, in its layout
        for label, budget in overhead_kinds(kinds):
            r = overhead_rounds(url, floor_url, pred, x, budget, args.sequential)
            same = abs(r["steps_http"] - r["steps_direct"]) < 1e-9
            over_ms, over_httpx = r["http"] - r["direct"], r["httpx"] - r["direct"]
            targets.append(over_ms <= OVERHEAD_TARGET_MS if same else None)
            verdict = {True: "yes", False: "no", None: "n/a (different steps)"}[targets[-1]]
            over.append(f"| {name} ({layout}) | {label} | {r['steps_direct']:.2f} / {r['steps_http']:.2f} | {r['direct']:.3f} | "
                        f"{r['http']:.3f} | **{over_ms:.3f}** | {verdict} | {r['httpx']:.3f} | {over_httpx:.3f} | "
                        f"{r['floor']:.3f} |")
            print(over[-1], flush=True)
    finally:
        if floor_proc is not None:
            floor_proc.terminate()
            floor_proc.wait(timeout=30)
    return rows, over, ok, targets


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of load per budget kind (default: 30)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    ap.add_argument("--images", type=int, default=1, help="images per request (default: 1)")
    ap.add_argument("--model", help="checkpoint folder (default: train a small digits ensemble with exits)")
    ap.add_argument("--members", default='["wrn-16-2","wrn-10-2"]', help="members of the default model")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the server and of the direct predictor (default: 1, as `serve`)")
    ap.add_argument("--sequential", type=int, default=300,
                    help="rounds of the overhead measurement, per budget kind (default: 300)")
    ap.add_argument("--ray", action="store_true", help="also benchmark Ray Serve (private local cluster, ~20 s start)")
    ap.add_argument("--skip-load", action="store_true", help="only the overhead measurement (no concurrent load)")
    ap.add_argument("--write", action="store_true", help="update the serve section of BENCHMARKS.md")
    args = ap.parse_args()
    if args.duration <= 0 or args.clients < 1 or args.images < 1:
        ap.error("--duration, --clients and --images must be positive")

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        ckpt = Path(args.model) if args.model else make_checkpoint(args.members, Path(tmp) / "ckpt")
        ck = load_anytime(ckpt)
        pred = AnytimePredictor.from_checkpoint(ck)
        mid = pred.cumulative_flops[(len(pred.steps) - 1) // 2]
        kinds = [("none (whole schedule)", None), (f"flops {mid / 1e6:.2f} M", {"flops": mid}),
                 ("ms 5", {"ms": 5.0}), ("ms 20", {"ms": 20.0}), ("confidence 0.9", {"confidence": 0.9})]
        if pred.table:  # per-input early exit at the level fitted for half the schedule's FLOPs on average
            mean = (pred.table[0]["bound"] + pred.table[-1]["bound"]) / 2
            kinds.append((f"mean_flops {mean / 1e6:.2f} M", {"mean_flops": mean}))
        g = torch.Generator().manual_seed(0)
        inputs = [torch.rand(args.images, ck.info.in_channels, *ck.info.image_size, generator=g) for _ in range(64)]
        header = [f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch "
                  f"thread(s), model "
                  f"{' + '.join(ck.model.names)} (exits all, {len(pred.steps)} steps, "
                  f"{pred.cumulative_flops[-1] / 1e6:.2f} MFLOPs/image), {args.clients} clients x "
                  f"{args.duration:g} s per budget, {args.images} image(s) per request, loopback; server and "
                  "clients share the machine",
                  "", "| server | budget | requests | req/s | p50 ms | p99 ms | server elapsed p50 / p99 ms | "
                  "deadline met | steps | batch images | errors | FLOPs over budget | check |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        print("\n".join(header), flush=True)
        overhead = ["", f"Server overhead at p50 over a direct `AnytimePredictor.predict` call on the same input and "
                        "budget, its conv weights in the layout the server runs that batch size in (`GET /model`) "
                        f"(1 request in flight, {args.sequential} rounds; each round: a round trip with "
                        "`http.client` (keep-alive), one with httpx, one to a trivial ASGI app on uvicorn answering "
                        "the same bytes (the floor), and the direct call, order rotated every round). "
                        f"Overhead = HTTP p50 - direct p50; target <= {OVERHEAD_TARGET_MS:g} ms (issue 15):", "",
                    "| server | budget | steps direct / HTTP | direct p50 ms | HTTP p50 ms | overhead ms | "
                    f"<= {OVERHEAD_TARGET_MS:g} ms | httpx p50 ms | httpx overhead ms | floor p50 ms |",
                    "|---|---|---|---|---|---|---|---|---|---|"]
        rows, ok, targets = [], True, []
        proc, url = start_uvicorn(ckpt, [f"--threads={args.threads}"])
        try:
            wait_healthy(url)
            r, o, good, t = bench_server("uvicorn", url, kinds, inputs, args, pred, tmp)
            rows += r
            overhead += o
            ok &= good
            targets += [(("uvicorn", label), v) for (label, _), v in zip(overhead_kinds(kinds), t)]
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if args.ray:
            port = free_port()
            stop = start_ray(ckpt, port)
            try:
                url = f"http://127.0.0.1:{port}"
                wait_healthy(url)
                r, o, good, t = bench_server("Ray Serve", url, kinds, inputs, args, pred, tmp)
                rows += r
                overhead += o
                ok &= good
                targets += [(("Ray Serve", label), v) for (label, _), v in zip(overhead_kinds(kinds), t)]
            finally:
                stop()
    text = "\n".join(header + rows + overhead)
    missed = [f"{srv} {label}" for (srv, label), v in targets if v is False]
    unequal = [f"{srv} {label}" for (srv, label), v in targets if v is None]
    text += (f"\n\nOverhead <= {OVERHEAD_TARGET_MS:g} ms: met for {sum(v is True for _, v in targets)} of "
             f"{len(targets)} budget kinds" + (f"; over: {', '.join(missed)}" if missed else "")
             + (f"; not comparable (the server ran other steps than the direct call): {', '.join(unequal)}"
                if unequal else "") + ".")
    text += (f"\n\nChecks: 0 errors, 0 FLOPs budget violations, p99 server elapsed <= deadline + "
             f"{DEADLINE_SLACK_MS:g} ms for deadlines >= {CHECKED_DEADLINE_MS:g} ms: {'all ok' if ok else 'FAILED'}.")
    print("\n" + text)
    if args.write:
        write_section("serve", text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
