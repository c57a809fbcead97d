"""taskarith's streaming merge against mergekit and FusionBench: wall time, peak memory and agreement.

What it measures. For each checkpoint set, each tool (taskarith, mergekit 0.1.5, FusionBench 0.2.33) and
each method (task arithmetic, TIES), the merge runs as its own subprocess, ``--repeats`` times (tools
interleaved run by run so that drift in machine load hits all of them alike). Per configuration it records
the median wall-clock seconds (process start to exit: imports, reading, merging, writing), the largest peak
resident set size (GNU ``/usr/bin/time -v``'s "Maximum resident set size" of that very child, which counts
resident pages of memory-mapped checkpoint files) and the largest anonymous peak (heap and tensors only,
sampled from /proc every 20 ms). The merged weights of the last run are then compared tensor by tensor with
taskarith's for the same method and set (max |difference|, fraction and location of entries off by more
than 1e-5), and task arithmetic additionally with a float64 reference ``base + sum(ft - base)``. Whether
other processes used the CPU meanwhile is recorded per set (``_measured.busy``).

Hyper-parameters are the same for every tool: task arithmetic with lambda 1.0 and weight 1.0 per model;
TIES with density 0.2, weight 1.0, lambda 1.0, sign elected by summed mass, disjoint mean. Where the tools
define these differently (where TIES trims, how many entries it keeps, zero-mass signs) the results' notes
say so, next to the numbers.

Checkpoint sets (random weights from transformers configs with fixed seeds, fp32 safetensors; each
"fine-tuned" copy is the base plus 1e-3 * N(0, 1) everywhere and 2e-2 * N(0, 1) on a seeded 2% of entries,
so TIES has large entries to keep and small ones to trim):

* ``llama58m``       LlamaForCausalLM, 58.1M parameters, single file, 4 copies;
* ``bert``           BertModel, 11.2M parameters, 4 copies (an encoder-only architecture);
* ``llama-sharded``  LlamaForCausalLM, 245M parameters in ~200 MB shards, 3 copies (the memory comparison).

Everything bulky goes under ``benchmarks/.peers/`` (git-ignored): the peers' virtualenvs (created on first
use with ``python3 -m venv``, torch==2.13.0 installed first so the peers keep the CPU build), the generated
checkpoints, the merge outputs (removed after comparison unless ``--keep-outputs``) and one log per run.
Re-running reuses venvs and checkpoints whose recorded spec matches, so it is idempotent.

Run (from the repository root; needs GNU time at /usr/bin/time):

    .venv/bin/python benchmarks/merge_vs_peers.py --quick          # tiny models: ~3 min with --repeats 1, ~8 min with 3
    .venv/bin/python benchmarks/merge_vs_peers.py                  # all sets, 3 repeats
    .venv/bin/python benchmarks/merge_vs_peers.py --sets llama58m --repeats 3

Results: ``benchmarks/results/merge_vs_peers.json`` (``--quick``: ``benchmarks/.peers/merge_vs_peers.quick.json``);
a re-run with some ``--sets`` replaces those sets' entries and keeps the others. Time on 2 idle cores: venv
creation about 3 minutes each (first run only); llama58m 6.7 minutes (measured, 3 repeats, plus ~20 s to
generate its checkpoints once); bert about 2 minutes; llama-sharded an estimated 20-25 minutes plus ~2
minutes of generation (not yet measured at full size). Every run is capped by RLIMIT_DATA (``--memory-cap-gb``,
default 90% of available memory): FusionBench's TIES, which flattens all models in memory (~8 GB for
llama58m), may exceed it on llama-sharded and is then reported as failed with its allocator's error. Disk:
about 8 GB at the peak (checkpoints 5.3 GB plus three 1 GB outputs of the sharded set at once).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS = HERE / ".peers"  # git-ignored: venvs, checkpoints, outputs, logs
HELPERS = HERE / "peers"
RESULTS = HERE / "results" / "merge_vs_peers.json"
QUICK_RESULTS = PEERS / "merge_vs_peers.quick.json"
TASKARITH = ROOT / ".venv" / "bin" / "taskarith"
GNU_TIME = "/usr/bin/time"  # GNU time (Debian package "time"): -v reports the child's own peak RSS

TOOLS = ("taskarith", "mergekit", "fusionbench")
METHODS = ("task_arithmetic", "ties")
SCALING, WEIGHT, DENSITY = 1.0, 1.0, 0.2
TORCH_PIN = "torch==2.13.0"  # resolves to the local CPU wheel; unpinned, pip would fetch a multi-GB CUDA build
BUSY_CORES = 0.25  # other processes' average CPU use (cores) above which a set's timings are flagged as disturbed
DIFF_ATOL = 1e-5  # entries further apart than this count as "different" (fp32 reordering noise is ~1e-7)

# Perturbations that make a "fine-tuned" copy: dense small noise plus sparse larger changes.
NOISE_STD, SPARSE_FRACTION, SPARSE_STD = 1e-3, 0.02, 2e-2


@dataclasses.dataclass(frozen=True)
class Peer:
    name: str
    venv: Path
    package: str
    version: str

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"


PEER_TOOLS = {
    "mergekit": Peer("mergekit", PEERS / "mergekit", "mergekit", "0.1.5"),
    "fusionbench": Peer("fusionbench", PEERS / "fusionbench", "fusion-bench", "0.2.33"),
}


@dataclasses.dataclass(frozen=True)
class CheckpointSet:
    name: str
    arch: str  # "llama" (LlamaForCausalLM) or "bert" (BertModel)
    config: dict[str, Any]
    copies: int
    shard_size: str | None  # save_pretrained's max_shard_size; None keeps one file
    seed: int

    @property
    def kind(self) -> str:
        """FusionBench's auto-class for this set (see benchmarks/peers/fusionbench_merge.py)."""
        return "causal-lm" if self.arch == "llama" else "base"

    def spec(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "noise": [NOISE_STD, SPARSE_FRACTION, SPARSE_STD]}


def _llama(hidden: int, intermediate: int, layers: int, heads: int, vocab: int) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
    }


def _bert(hidden: int, layers: int, heads: int, intermediate: int, vocab: int) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": intermediate,
        "vocab_size": vocab,
        "max_position_embeddings": 512,
    }


FULL_SETS = {
    "llama58m": CheckpointSet("llama58m", "llama", _llama(512, 1376, 8, 8, 32000), 4, None, 58),
    "bert": CheckpointSet("bert", "bert", _bert(256, 4, 4, 1024, 30522), 4, None, 11),
    "llama-sharded": CheckpointSet("llama-sharded", "llama", _llama(1024, 2816, 14, 16, 32000), 3, "200MB", 245),
}
QUICK_SETS = {
    "llama58m": CheckpointSet("llama58m", "llama", _llama(64, 172, 2, 4, 1000), 4, None, 58),
    "bert": CheckpointSet("bert", "bert", _bert(64, 2, 4, 128, 1000), 4, None, 11),
    "llama-sharded": CheckpointSet("llama-sharded", "llama", _llama(128, 344, 2, 4, 2000), 3, "400KB", 245),
}


# environment --------------------------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """Offline and quiet: no tool may wait on a hub that this machine cannot reach."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    env.pop("PYTHONPATH", None)  # the peers must not see this project's packages
    return env


def installed_versions(python: Path, packages: Sequence[str]) -> dict[str, str | None]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "def v(p):\n"
        "    try: return m.version(p)\n"
        "    except m.PackageNotFoundError: return None\n"
        "print(json.dumps({p: v(p) for p in sys.argv[1:]}))"
    )
    done = subprocess.run([str(python), "-c", code, *packages], capture_output=True, text=True, env=child_env())
    if done.returncode != 0:
        return {p: None for p in packages}
    return json.loads(done.stdout)


def ensure_venv(peer: Peer) -> dict[str, str | None]:
    """Create the peer's venv once; torch is pinned first so installing the peer keeps the CPU build."""
    wanted = {peer.package: peer.version, "torch": TORCH_PIN.split("==")[1]}
    if peer.python.exists():
        have = installed_versions(peer.python, list(wanted))
        if all((have.get(p) or "").split("+")[0] == v for p, v in wanted.items()):
            return have
        print(f"[venv] {peer.venv} has {have}, wanted {wanted}: reinstalling")
    PEERS.mkdir(parents=True, exist_ok=True)
    log = PEERS / f"{peer.name}-install.log"
    print(f"[venv] creating {peer.venv} ({peer.package}=={peer.version}); log in {log} (a few minutes)")
    with open(log, "w") as fh:
        for cmd in (
            [sys_python3(), "-m", "venv", str(peer.venv)],
            [str(peer.python), "-m", "pip", "install", TORCH_PIN],
            [str(peer.python), "-m", "pip", "install", f"{peer.package}=={peer.version}"],
        ):
            fh.write(f"$ {' '.join(cmd)}\n")
            fh.flush()
            if subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode != 0:
                raise SystemExit(f"installing {peer.package} failed; see {log}")
    have = installed_versions(peer.python, list(wanted))
    if (have.get("torch") or "").split("+")[0] != wanted["torch"]:
        raise SystemExit(f"{peer.package} replaced torch with {have.get('torch')}; see {log}")
    return have


def sys_python3() -> str:
    return shutil.which("python3") or sys.executable


def taskarith_cli_error() -> str | None:
    """None when ``taskarith merge`` works (it is being finished in parallel), else why not."""
    if not TASKARITH.exists():
        return f"{TASKARITH} not found"
    done = subprocess.run([str(TASKARITH), "merge", "--list"], capture_output=True, text=True, env=child_env())
    return (
        None if done.returncode == 0 else "taskarith merge --list failed: " + last_error_line(done.stdout + done.stderr)
    )


def import_floor(python: Path) -> dict[str, float]:
    """Wall and peak RSS of ``python -c 'import torch'``: the floor under every tool's figures in that venv."""
    run = run_measured(
        [str(python), "-c", "import torch"], PEERS / "logs" / f"floor-{python.parent.parent.name}.log", 120
    )
    return {"wall_s": round(run.wall_s, 3), "peak_rss_mb": round(run.peak_rss_mb, 1)}


def machine_info(peer_versions: dict[str, dict[str, str | None]]) -> dict[str, Any]:
    from importlib.metadata import version

    import transformers

    mem_kb = next(
        (
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal:")
        ),
        0,
    )
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(mem_kb / 1024**2, 1),
        "platform": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "taskarith": version("taskarith"),
        "peers": peer_versions,
        "import_torch_floor": {
            "taskarith": import_floor(Path(sys.executable)),
            **{name: import_floor(peer.python) for name, peer in PEER_TOOLS.items() if name in peer_versions},
        },
        "utc": now(),
    }


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds used by the whole machine, by this process and its reaped children) so far.

    The load average cannot tell whether the machine was busy, since the merges themselves keep it near 2;
    the machine's CPU time minus our own over a set is what the others used.
    """
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    machine = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    mine = sum(
        getattr(resource.getrusage(who), f)
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        for f in ("ru_utime", "ru_stime")
    )
    return machine, mine


def available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024**2
    return 0.0


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# checkpoints --------------------------------------------------------------------------------------------


def set_dir(cset: CheckpointSet, quick: bool) -> Path:
    return PEERS / "checkpoints" / ("quick" if quick else "full") / cset.name


def model_dirs(cset: CheckpointSet, quick: bool) -> tuple[Path, list[Path]]:
    root = set_dir(cset, quick)
    return root / "base", [root / f"ft{i}" for i in range(cset.copies)]


def build_model(cset: CheckpointSet) -> torch.nn.Module:
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cset.seed)
    if cset.arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**cset.config)).float().eval()
    return BertModel(BertConfig(**cset.config)).float().eval()


def perturbation(like: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded 'fine-tuning' change: dense small noise plus a sparse set of larger moves."""
    gen = torch.Generator().manual_seed(seed)
    dense = NOISE_STD * torch.randn(like.shape, generator=gen)
    sparse = SPARSE_STD * torch.randn(like.shape, generator=gen)
    keep = torch.rand(like.shape, generator=gen) < SPARSE_FRACTION
    return dense + sparse * keep


def save(model: torch.nn.Module, folder: Path, shard_size: str | None) -> None:
    kwargs = {"max_shard_size": shard_size} if shard_size else {"max_shard_size": "100GB"}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)


def ensure_checkpoints(cset: CheckpointSet, quick: bool) -> None:
    """Generate the set unless a complete one with the same spec is already there (built aside, then renamed)."""
    root = set_dir(cset, quick)
    marker = root / "spec.json"
    if marker.is_file() and json.loads(marker.read_text()) == cset.spec():
        return
    print(f"[checkpoints] generating {cset.name} in {root}")
    building = root.with_name(root.name + ".partial")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    model = build_model(cset)
    save(model, building / "base", cset.shard_size)
    params = dict(model.named_parameters())
    base = {name: p.detach().clone() for name, p in params.items()}
    with torch.no_grad():
        for copy in range(cset.copies):
            for index, (name, p) in enumerate(params.items()):
                # The seed depends on (set, copy, tensor) only, so every copy differs and reruns agree.
                p.copy_(base[name] + perturbation(p, cset.seed * 1_000_003 + copy * 10_007 + index))
            save(model, building / f"ft{copy}", cset.shard_size)
    (building / "spec.json").write_text(json.dumps(cset.spec(), indent=2))
    shutil.rmtree(root, ignore_errors=True)
    os.replace(building, root)


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    return sorted(folder.glob("*.safetensors"))


def tensor_locations(folder: Path) -> dict[str, Path]:
    locations: dict[str, Path] = {}
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as fh:
            locations.update({name: path for name in fh.keys()})
    return locations


def describe_checkpoints(cset: CheckpointSet, quick: bool) -> dict[str, Any]:
    base, fts = model_dirs(cset, quick)
    files = weight_files(base)
    params = 0
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            params += sum(torch.Size(fh.get_slice(n).get_shape()).numel() for n in fh.keys())
    size = sum(p.stat().st_size for p in files)
    return {
        "architecture": "LlamaForCausalLM" if cset.arch == "llama" else "BertModel",
        "params": params,
        "bytes": size,
        "shards": len(files),
        "copies": len(fts),
        "dtype": "float32",
        "total_bytes": size * (1 + len(fts)),
        "config": cset.config,
    }


# running the tools -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    wall_s: float
    peak_rss_mb: float
    returncode: int
    log: Path
    error: str | None = None
    phases: dict[str, float] | None = None
    peak_anon_mb: float | None = None
    sync_s: float = 0.0  # fsync of the tool's output after it exited (see sync_output)


def sync_output(folder: Path) -> float:
    """Seconds to fsync every file a tool wrote, right after it exits.

    A tool that does not sync leaves its output in the page cache for the kernel to write back later, which
    both flatters its own wall time and slows whichever run comes next; syncing here puts the write-back in
    its own column (durable_wall_s = wall_s + sync_s) and starts every run with a clean cache.
    """
    start = time.perf_counter()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    return time.perf_counter() - start


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        try:
            kids = [int(x) for x in Path(f"/proc/{current}/task/{current}/children").read_text().split()]
        except (OSError, ValueError):
            kids = []
        found += kids
        todo += kids
    return found


def _anon_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class AnonSampler(threading.Thread):
    """Samples the anonymous part of the tool's RSS every 20 ms.

    GNU time's peak RSS also counts the resident pages of memory-mapped checkpoint files, which the
    streaming tools (taskarith, mergekit) touch one after another and the kernel may drop at any time; the
    anonymous part (heap, tensors) is the memory a merge really needs. Sampling can miss a spike shorter
    than the interval, so this is a lower bound of the true anonymous peak.
    """

    def __init__(self, pid: int, interval_s: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval_s, self.peak_kb = pid, interval_s, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak_kb = max(self.peak_kb, sum(_anon_kb(p) for p in _descendants(self.pid)))
            self.done.wait(self.interval_s)


def _limit_data(cap_bytes: int | None) -> None:
    """RLIMIT_DATA (private writable memory, not file mmaps): a tool that needs more fails with a memory
    error instead of waking the kernel's OOM killer on a shared machine."""
    if cap_bytes:
        resource.setrlimit(resource.RLIMIT_DATA, (cap_bytes, cap_bytes))


def run_measured(cmd: Sequence[str], log: Path, timeout_s: float, memory_cap: int | None = None) -> Run:
    """Run ``cmd`` alone and measure it: wall clock from spawn to exit, peak RSS from GNU time.

    Not ``os.wait4``/``RUSAGE_CHILDREN`` here: Linux records the *parent's* peak RSS as the child's at exec
    (the child's pre-exec memory is the parent's), so every child would be floored at this script's own
    peak (~400 MB after generating checkpoints). /usr/bin/time is tiny, so the floor it passes on is ~2 MB.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    timefile = log.with_suffix(".time")
    timefile.unlink(missing_ok=True)
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        start = time.perf_counter()
        # A session of its own, so that a timeout kills the tool and not only /usr/bin/time.
        proc = subprocess.Popen(
            [GNU_TIME, "-v", "-o", str(timefile), *cmd],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=child_env(),
            cwd=ROOT,
            start_new_session=True,
            preexec_fn=(lambda: _limit_data(memory_cap)) if memory_cap else None,
        )
        sampler = AnonSampler(proc.pid)
        sampler.start()
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            returncode = proc.wait()
        wall = time.perf_counter() - start
        sampler.done.set()
        sampler.join()
    text = log.read_text(errors="replace")
    timing = timefile.read_text(errors="replace") if timefile.is_file() else ""
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", timing)
    run = Run(
        wall_s=wall,
        peak_rss_mb=int(peak.group(1)) / 1024 if peak else float("nan"),
        returncode=returncode,
        log=log,
        peak_anon_mb=sampler.peak_kb / 1024,
    )
    if returncode != 0:
        killed = re.search(r"Command terminated by signal (\d+)", timing)
        if wall >= timeout_s:
            run.error = f"timed out after {timeout_s:.0f} s"
        elif killed:  # e.g. SIGKILL from the kernel's out-of-memory killer: the log has no traceback
            run.error = (
                f"killed by signal {killed.group(1)} (9: likely out of memory); last output: {last_error_line(text)}"
            )
        else:
            run.error = last_error_line(text)
    phases = re.findall(r"^PHASES (\{.*\})$", text, flags=re.MULTILINE)
    if phases:
        run.phases = json.loads(phases[-1])
    return run


_EXCEPTION_LINE = re.compile(r"^\s*((?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)\b.*)$")


def last_error_line(text: str) -> str:
    """The line naming the exception (the last one wins), with the innermost traceback frame if any."""
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    for i in range(len(lines) - 1, -1, -1):
        match = _EXCEPTION_LINE.match(lines[i])
        if match:
            frames = [re.match(r'\s*File "(.+)", line (\d+), in (\S+)', line) for line in lines[:i]]
            frames = [f for f in frames if f]
            where = ""
            if frames:
                path, line_no, func = frames[-1].groups()
                short = path.split("site-packages/")[-1]
                where = f" (at {short}:{line_no} in {func})"
            # Some messages (torch's allocator) continue on the next lines; keep a few of them.
            message = " ".join([match.group(1), *(line.strip() for line in lines[i + 1 : i + 3])])
            return (message + where)[:500]
    return (lines[-1] if lines else "(no output)")[:500]


def taskarith_command(method: str, base: Path, fts: Sequence[Path], out: Path, cset: CheckpointSet) -> list[str]:
    cmd = [str(TASKARITH), "merge", "--method", method, "--base", str(base)]
    for ft in fts:
        cmd += ["--model", f"{ft}:{WEIGHT}"]
    cmd += ["--out", str(out), "--set", f"scaling={SCALING}"]
    if method == "ties":
        cmd += ["--set", f"density={DENSITY}"]
    return cmd


def mergekit_config(method: str, base: Path, fts: Sequence[Path]) -> dict[str, Any]:
    model_params: dict[str, float] = {"weight": WEIGHT}
    shared: dict[str, Any] = {"lambda": SCALING, "normalize": False}
    if method == "ties":
        model_params["density"] = DENSITY
        # normalize=True divides by the summed weights of the agreeing models: the disjoint mean.
        shared = {"lambda": SCALING, "normalize": True, "int8_mask": False}
    return {
        "merge_method": method,
        "base_model": str(base),
        "dtype": "float32",
        "parameters": shared,
        "models": [{"model": str(ft), "parameters": model_params} for ft in fts],
    }


def mergekit_command(method: str, base: Path, fts: Sequence[Path], out: Path, cset: CheckpointSet) -> list[str]:
    config = out.parent / f"{out.name}.mergekit.yml"
    # JSON is valid YAML, and needs no YAML library here.
    config.write_text(json.dumps(mergekit_config(method, base, fts), indent=2))
    peer = PEER_TOOLS["mergekit"]
    # --no-copy-tokenizer: the generated checkpoints have no tokenizer; every other flag is mergekit's default
    # (CPU, lazy safetensors reads, synchronous writes, 5B-parameter output shards, model card written).
    return [str(peer.venv / "bin" / "mergekit-yaml"), str(config), str(out), "--no-copy-tokenizer"]


def fusionbench_command(method: str, base: Path, fts: Sequence[Path], out: Path, cset: CheckpointSet) -> list[str]:
    cmd = [
        str(PEER_TOOLS["fusionbench"].python),
        str(HELPERS / "fusionbench_merge.py"),
        "--method",
        method,
        "--base",
        str(base),
        "--out",
        str(out),
        "--kind",
        cset.kind,
        "--scaling",
        str(SCALING),
        "--density",
        str(DENSITY),
    ]
    for ft in fts:
        cmd += ["--model", str(ft)]
    return cmd


COMMANDS = {"taskarith": taskarith_command, "mergekit": mergekit_command, "fusionbench": fusionbench_command}


# correctness -------------------------------------------------------------------------------------------


def load_tensor(locations: dict[str, Path], name: str) -> torch.Tensor:
    # safe_open memory-maps the file: only the one tensor is read.
    with safe_open(str(locations[name]), framework="pt") as fh:
        return fh.get_tensor(name)


def compare(candidate: Path, reference: Path) -> dict[str, Any]:
    """How far ``candidate``'s tensors are from ``reference``'s (both merged outputs, read memory-mapped).

    Besides max |difference| and the fraction of entries off by more than DIFF_ATOL, it tallies where the
    differing entries are: the most in any one tensor, and how many lie in tensors whose TIES keep-count
    DENSITY * n is a whole number. Tools that trim per tensor and differ only in rounding that count
    (ceil vs floor) then show 0 there and at most one entry per fine-tuned model elsewhere.
    """
    cand, ref = tensor_locations(candidate), tensor_locations(reference)
    worst, differing, total, most_in_one, in_exact_k = 0.0, 0, 0, 0, 0
    for name in sorted(set(cand) & set(ref)):
        a, b = load_tensor(cand, name).double(), load_tensor(ref, name).double()
        if a.shape != b.shape:
            return {"error": f"tensor {name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"}
        diff = (a - b).abs()
        count = int((diff > DIFF_ATOL).sum())
        worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
        differing += count
        total += diff.numel()
        most_in_one = max(most_in_one, count)
        if abs(DENSITY * diff.numel() - round(DENSITY * diff.numel())) < 1e-6:
            in_exact_k += count
    out: dict[str, Any] = {
        "max_abs_diff": worst,
        "frac_entries_differ": differing / total if total else None,
        "entries_differ": differing,
        "max_entries_differ_in_one_tensor": most_in_one,
        "entries_differ_in_tensors_with_whole_keep_count": in_exact_k,
    }
    missing, extra = sorted(set(ref) - set(cand)), sorted(set(cand) - set(ref))
    if missing:
        out["missing_tensors"] = missing[:10]
    if extra:
        out["extra_tensors"] = extra[:10]
    return out


def compare_to_task_arithmetic_reference(candidate: Path, base: Path, fts: Sequence[Path]) -> float:
    """Max |candidate - (base + sum_i (ft_i - base))|, the reference in float64, tensor by tensor."""
    cand, base_loc = tensor_locations(candidate), tensor_locations(base)
    ft_locs = [tensor_locations(f) for f in fts]
    worst = 0.0
    for name in sorted(set(cand) & set(base_loc)):
        stored = load_tensor(base_loc, name)
        if not stored.is_floating_point():
            continue  # integer buffers are copied, not merged
        theta0 = stored.double()
        expected = theta0 + sum((load_tensor(loc, name).double() - theta0 for loc in ft_locs), torch.zeros_like(theta0))
        worst = max(worst, float((load_tensor(cand, name).double() - expected).abs().max()))
    return worst


# the benchmark -----------------------------------------------------------------------------------------


def output_dir(cset: CheckpointSet, quick: bool, tool: str, method: str) -> Path:
    return PEERS / "outputs" / ("quick" if quick else "full") / cset.name / f"{tool}-{method}"


def bench_set(
    cset: CheckpointSet,
    quick: bool,
    tools: Sequence[str],
    repeats: int,
    timeout_s: float,
    keep_outputs: bool,
    unavailable: dict[str, str],
    memory_cap: int | None,
) -> dict[str, Any]:
    base, fts = model_dirs(cset, quick)
    results: dict[str, dict[str, Any]] = {tool: {} for tool in tools}
    for method in METHODS:
        runs: dict[str, list[Run]] = {tool: [] for tool in tools}
        for repeat in range(repeats):
            # Rotate the order each repeat so no tool always runs first (cold page cache) or last.
            order = list(tools[repeat % len(tools) :]) + list(tools[: repeat % len(tools)])
            for tool in order:
                if tool in unavailable or any(r.error for r in runs[tool]):
                    continue  # a tool that failed once fails the same way again: don't spend time repeating it
                out = output_dir(cset, quick, tool, method)
                shutil.rmtree(out, ignore_errors=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                cmd = COMMANDS[tool](method, base, fts, out, cset)
                log = PEERS / "logs" / ("quick" if quick else "full") / cset.name / f"{tool}-{method}-{repeat}.log"
                run = run_measured(cmd, log, timeout_s, memory_cap)
                run.sync_s = sync_output(out)
                runs[tool].append(run)
                status = (
                    f"FAILED: {run.error}"
                    if run.error
                    else f"{run.wall_s:7.2f} s (+{run.sync_s:5.2f} s sync)  {run.peak_rss_mb:8.1f} MB  "
                    f"(anonymous {run.peak_anon_mb:8.1f} MB)"
                )
                print(f"[{cset.name}] {method:15s} {tool:11s} run {repeat + 1}/{repeats}  {status}", flush=True)
        for tool in tools:
            results[tool][method] = summarize(runs[tool], unavailable.get(tool))
        add_agreement(results, cset, quick, method, tools, base, fts)
        if not keep_outputs:
            for tool in tools:
                shutil.rmtree(output_dir(cset, quick, tool, method), ignore_errors=True)
    return results


def summarize(runs: Sequence[Run], unavailable: str | None) -> dict[str, Any]:
    if unavailable:
        return {"runs": 0, "error": unavailable}
    good = [r for r in runs if r.error is None]
    entry: dict[str, Any] = {"runs": len(good)}
    if good:
        entry.update(
            wall_s=round(statistics.median(r.wall_s for r in good), 3),
            peak_rss_mb=round(max(r.peak_rss_mb for r in good), 1),
            peak_anon_mb=round(max(r.peak_anon_mb or 0.0 for r in good), 1),
            wall_all_s=[round(r.wall_s, 3) for r in good],
            durable_wall_s=round(statistics.median(r.wall_s + r.sync_s for r in good), 3),
            sync_after_all_s=[round(r.sync_s, 3) for r in good],
            peak_rss_all_mb=[round(r.peak_rss_mb, 1) for r in good],
        )
        phases = [r.phases for r in good if r.phases]
        if phases:
            entry["phases_median_s"] = {k: round(statistics.median(p[k] for p in phases), 3) for k in phases[0]}
    failed = [r for r in runs if r.error]
    if failed:
        entry["error"] = failed[0].error
        entry["log"] = str(failed[0].log.relative_to(ROOT))
    return entry


def add_agreement(
    results: dict[str, dict[str, Any]],
    cset: CheckpointSet,
    quick: bool,
    method: str,
    tools: Sequence[str],
    base: Path,
    fts: Sequence[Path],
) -> None:
    """Compare each tool's last output with taskarith's (and with the float64 reference for task arithmetic)."""
    reference = output_dir(cset, quick, "taskarith", method)
    have_reference = "taskarith" in tools and results["taskarith"][method].get("runs", 0) > 0
    for tool in tools:
        entry = results[tool][method]
        out = output_dir(cset, quick, tool, method)
        if not entry.get("runs") or not out.is_dir():
            continue
        if have_reference:
            found = compare(out, reference)
            if "error" in found:
                entry["compare_error"] = found.pop("error")
            entry.update(found)
        if method == "task_arithmetic":
            entry["max_abs_diff_vs_reference"] = compare_to_task_arithmetic_reference(out, base, fts)


# notes and summary -------------------------------------------------------------------------------------


DEFINITION_NOTES = [
    "Task arithmetic is defined identically by all three tools: base + lambda * sum_i w_i (ft_i - base). "
    "taskarith: --set scaling=1.0 and weight 1.0 per --model; mergekit: merge_method task_arithmetic, "
    "weight 1.0 per model, lambda 1.0, normalize false (its default for this method); FusionBench: "
    "TaskArithmeticAlgorithm(scaling_factor=1.0) (it has no per-model weight).",
    "TIES trim scope: FusionBench (ties_merging_utils.topk_values_mask) concatenates every tensor of the model "
    "in sorted-name order into one vector and keeps its top 20% by magnitude, as in the TIES paper; taskarith "
    "and mergekit (sparsify.magnitude) trim each tensor on its own (top 20% of that tensor). FusionBench's "
    "output therefore differs from the other two by design wherever tensors' delta scales differ.",
    "TIES kept count: taskarith keeps ceil(0.2 * n) entries per tensor (at least one); mergekit keeps "
    "max(1, int(0.2 * n)) = floor (so one entry fewer whenever 0.2*n is not an integer, which is why "
    "taskarith and mergekit differ in a handful of entries); FusionBench keeps every entry >= the "
    "(n - int(0.2 n))-th smallest magnitude of the whole model, i.e. int(0.2 n) + 1 plus any ties.",
    "TIES tie-breaking at the threshold: taskarith keeps the lowest flat indices; mergekit takes "
    "torch.argsort's order; FusionBench keeps all tied entries. This is not academic: deltas ft - base are "
    "computed in fp32 and so quantized to the base's ulp, and a 16M-entry tensor (the 32000x512 embedding) "
    "has ~10 entries of exactly the threshold magnitude. That, plus ceil vs floor, is all that separates "
    "taskarith's TIES from mergekit's (see entries_differ*, a few hundred entries out of 58M).",
    "TIES sign election: all three take the sign of the summed trimmed deltas ('mass'; mergekit "
    "consensus_method sum). Where that sum is exactly 0: taskarith uses the majority elected sign of the "
    "tensor, FusionBench the majority over the whole model, mergekit +1.",
    "TIES disjoint merge: all three average the non-zero trimmed deltas that agree with the elected sign "
    "(taskarith by construction; mergekit normalize=true divides by the summed weights of the agreeing models, "
    "= their count at weight 1; FusionBench merge_func='mean', not its shipped default 'sum'). Then lambda=1.0: "
    "taskarith --set scaling=1.0, mergekit lambda 1.0 (its default), FusionBench scaling_factor=1.0 "
    "(its shipped configs use 0.3).",
    "mergekit TIES: rescale=false (default for ties), int8_mask=false, dtype float32. mergekit computes each "
    "model's sparsified delta then multiplies by its weight; with weight 1.0 the order does not matter.",
    "Wall time is the whole process (interpreter start, imports, reading, merging, writing). FusionBench's "
    "import of fusion_bench (lightning, hydra, ...) is part of it; its phases_median_s splits import / "
    "load+merge / save. FusionBench holds the base and fine-tuned models in memory (TIES: their flattened "
    "copies too); taskarith and mergekit stream tensor by tensor. taskarith's task-arithmetic and TIES "
    "merges of checkpoints run on NumPy arrays and never import torch (taskarith/merging/kernels.py, the "
    "same code its in-memory merge runs on tensors); its process still starts the typer/rich CLI.",
    "Peak RSS is GNU time's 'Maximum resident set size' of the tool's process; it counts resident pages of "
    "memory-mapped safetensors files (mergekit reads through mmap; taskarith reads tensors with read() into "
    "reused buffers, so its RSS is all anonymous memory), which the kernel can "
    "reclaim. peak_anon_mb is the anonymous part only (heap and tensors, sampled every 20 ms from "
    "/proc/PID/status RssAnon, so a lower bound): the memory a merge actually needs. "
    "machine.import_torch_floor gives each venv's `python -c 'import torch'` for scale.",
    "Every merge run is started under RLIMIT_DATA = results.<set>._measured.memory_cap_gb (default 90% of the "
    "memory available at start; it limits private writable memory, not file mappings), so a tool that needs "
    "more fails with its own memory error instead of triggering the kernel's OOM killer.",
    "mergekit 0.1.5 on BertModel: its architecture file bert.json gives weights aliases, which its pydantic "
    "WeightInfo stores as a tuple; plan.py (plan_tensor, for optional weights such as the pooler) evaluates "
    "[w_in.name] + (w_in.aliases or []), list + tuple, and raises TypeError before merging anything. "
    "llama.json has no aliases, so Llama merges are unaffected.",
    "Output layout: taskarith writes 2 GB shards (its default), mergekit 5B-parameter shards (default), "
    "FusionBench save_pretrained's default; all safetensors, fp32.",
]


def dynamic_notes(results: dict[str, Any]) -> list[str]:
    notes = []
    for set_name, per_set in results.items():
        measured = per_set.get("_measured", {})
        if measured.get("busy"):
            others = measured.get("other_processes_cpu_cores")
            used = (
                f"other processes used {others:.2f} of {os.cpu_count()} cores on average"
                if others is not None
                else f"1-minute load average {measured.get('loadavg_before', [float('nan')])[0]:.2f}"
            )
            notes.append(
                f"{set_name}: the machine was busy while measuring ({used}): timings are disturbed; "
                "re-run on an idle machine."
            )
        for tool, per_tool in per_set.items():
            if tool.startswith("_"):
                continue
            for method, entry in per_tool.items():
                if entry.get("error"):
                    notes.append(f"{set_name}/{tool}/{method} failed: {entry['error']}")
    return notes


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def derived_summary(results: dict[str, Any]) -> dict[str, Any]:
    """Speed-up (peer wall / taskarith wall) and memory ratio (taskarith peak / peer peak) per set and method."""
    summary: dict[str, Any] = {}
    for set_name, per_set in results.items():
        ta = per_set.get("taskarith", {})
        for peer in ("mergekit", "fusionbench"):
            for method in METHODS:
                mine, theirs = ta.get(method, {}), per_set.get(peer, {}).get(method, {})
                key = f"{set_name}/{method}/taskarith_vs_{peer}"
                summary[key] = {
                    "speedup": ratio(theirs.get("wall_s"), mine.get("wall_s")),
                    "durable_speedup": ratio(theirs.get("durable_wall_s"), mine.get("durable_wall_s")),
                    "memory_ratio": ratio(mine.get("peak_rss_mb"), theirs.get("peak_rss_mb")),
                    "anon_memory_ratio": ratio(mine.get("peak_anon_mb"), theirs.get("peak_anon_mb")),
                }
    summary["_meaning"] = (
        "speedup = peer median wall / taskarith median wall (>1: taskarith faster); "
        "durable_speedup = the same for wall + fsync of the output after exit (taskarith "
        "syncs before it exits, mergekit and FusionBench do not); "
        "memory_ratio = taskarith peak RSS / peer peak RSS (<1: taskarith uses less); "
        "anon_memory_ratio = the same for the sampled anonymous (non-file) peak"
    )
    return summary


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def print_table(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="merge: taskarith vs mergekit vs FusionBench" + (" (--quick)" if doc.get("quick") else ""))
    for column in (
        "set",
        "tool",
        "method",
        "wall s",
        "peak MB",
        "anon MB",
        "max|Δ| vs taskarith",
        "frac Δ>1e-5",
        "max|Δ| vs ref",
        "error",
    ):
        table.add_column(column, overflow="fold")

    def fmt(v: Any, f: str) -> str:
        return "" if v is None else format(v, f)

    ordered = [n for n in FULL_SETS if n in doc["results"]] + [n for n in doc["results"] if n not in FULL_SETS]
    for set_name in ordered:
        per_set = doc["results"][set_name]
        for tool in TOOLS:
            for method in METHODS:
                e = per_set.get(tool, {}).get(method)
                if e is None:
                    continue
                table.add_row(
                    set_name,
                    tool,
                    method,
                    fmt(e.get("wall_s"), ".2f"),
                    fmt(e.get("peak_rss_mb"), ".0f"),
                    fmt(e.get("peak_anon_mb"), ".0f"),
                    fmt(e.get("max_abs_diff"), ".2e"),
                    fmt(e.get("frac_entries_differ"), ".2e"),
                    fmt(e.get("max_abs_diff_vs_reference"), ".2e"),
                    escape((e.get("error") or "")[:160]),
                )
    console = Console(width=200)
    console.print(table)
    for key, value in doc["summary"].items():
        if not key.startswith("_") and (value["speedup"] or value["memory_ratio"]):
            console.print(
                f"{key}: speed-up x{value['speedup']} (durable x{value.get('durable_speedup')}), "
                f"memory ratio {value['memory_ratio']} "
                f"(anonymous {value.get('anon_memory_ratio')})"
            )


def main() -> None:
    if not Path(GNU_TIME).is_file():
        raise SystemExit(f"{GNU_TIME} not found: install GNU time (apt-get install time); it measures peak RSS")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models (a smoke test; results go to .peers/)")
    parser.add_argument("--sets", default=",".join(FULL_SETS), help=f"comma-separated subset of {','.join(FULL_SETS)}")
    parser.add_argument(
        "--tools", default=",".join(TOOLS), help="comma-separated subset of taskarith,mergekit,fusionbench"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before one merge run is killed")
    parser.add_argument(
        "--keep-outputs", action="store_true", help="keep merged models under benchmarks/.peers/outputs"
    )
    parser.add_argument(
        "--memory-cap-gb",
        type=float,
        default=None,
        help="RLIMIT_DATA per merge run (default: 90%% of available memory at start; 0: none)",
    )
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: see the module docstring)")
    args = parser.parse_args()

    catalogue = QUICK_SETS if args.quick else FULL_SETS
    names = [s.strip() for s in args.sets.split(",") if s.strip()]
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = [n for n in names if n not in catalogue] + [t for t in tools if t not in TOOLS]
    if unknown or args.repeats < 1:
        parser.error(f"unknown sets/tools {unknown}" if unknown else "--repeats must be >= 1")
    out_path = args.out or (QUICK_RESULTS if args.quick else RESULTS)
    cap_gb = args.memory_cap_gb if args.memory_cap_gb is not None else round(0.9 * available_gb(), 1)
    memory_cap = int(cap_gb * 1024**3) if cap_gb > 0 else None

    peer_versions = {peer.name: ensure_venv(peer) for name, peer in PEER_TOOLS.items() if name in tools}
    unavailable: dict[str, str] = {}
    if "taskarith" in tools and (why := taskarith_cli_error()):
        unavailable["taskarith"] = why
        print(f"[taskarith] skipped: {why}")
    for name in names:
        ensure_checkpoints(catalogue[name], args.quick)

    previous = json.loads(out_path.read_text()) if out_path.is_file() else {}
    if previous.get("quick") != args.quick:
        previous = {}
    results: dict[str, Any] = dict(previous.get("results", {}))
    checkpoints: dict[str, Any] = dict(previous.get("checkpoints", {}))
    for name in names:
        cset = catalogue[name]
        checkpoints[name] = describe_checkpoints(cset, args.quick)
        before, started, clock = os.getloadavg(), now(), time.perf_counter()
        cpu_before = cpu_seconds()
        per_set = bench_set(
            cset, args.quick, tools, args.repeats, args.timeout, args.keep_outputs, unavailable, memory_cap
        )
        cpu_after, elapsed = cpu_seconds(), time.perf_counter() - clock
        others = max(0.0, (cpu_after[0] - cpu_before[0]) - (cpu_after[1] - cpu_before[1])) / elapsed
        per_set["_measured"] = {
            "utc_start": started,
            "utc_end": now(),
            "loadavg_before": before,
            "other_processes_cpu_cores": round(others, 3),
            "repeats": args.repeats,
            "memory_cap_gb": cap_gb if memory_cap else None,
            "busy": others > BUSY_CORES,
        }
        results[name] = per_set

    order = [n for n in FULL_SETS if n in results] + [n for n in results if n not in FULL_SETS]
    results = {n: results[n] for n in order}
    doc = {
        "quick": args.quick,
        "machine": machine_info(peer_versions),
        "checkpoints": checkpoints,
        "results": results,
        "summary": derived_summary(results),
        "hyperparameters": {
            "task_arithmetic": {"lambda": SCALING, "weight": WEIGHT},
            "ties": {
                "density": DENSITY,
                "weight": WEIGHT,
                "lambda": SCALING,
                "sign": "sum (mass)",
                "merge": "disjoint mean",
            },
        },
        "notes": DEFINITION_NOTES + dynamic_notes(results),
    }
    write_json_atomic(out_path, doc)
    print_table(doc)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
