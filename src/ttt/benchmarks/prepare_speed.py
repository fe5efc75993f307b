"""Corpus preparation (``ttt data prepare``): throughput in MB of text per second and peak memory.

Builds, offline, a JSONL corpus of ``--size-gb`` GB of text from the built-in Shakespeare works (each
play cut into ~4 KB documents at blank lines; the documents repeated in a new shuffled order per copy),
then times ``ttt data prepare`` on it in a fresh process for each worker count, sampling the memory of
the whole process tree (the command and its workers) from ``/proc`` every 0.1 s:

* the full corpus with the ``byte`` tokenizer: the streaming pipeline itself (read, hash, split, ship to
  workers, write shards) and its memory bound at full size;
* its first ``--bpe-mb`` MB with a 16k-token BPE tokenizer (trained once by ``ttt data prepare`` on
  Shakespeare and reused): the tokenizer's throughput, the cost that dominates real preparations, used
  for the projection to the 125m recipe's 2.5B tokens.

    python -m ttt.benchmarks.prepare_speed --work-dir /tmp/ttt-prepare-bench   # ~5 min on 2 cores

Writes ``benchmarks/results/prepare_speed.json`` (+ ``.md``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ttt.util.files import atomic_open, atomic_write_json

RECIPE_TOKENS = 2_500_000_000  # the 125m recipe's training tokens (configs/125m.yaml)
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _documents() -> list[str]:
    """Shakespeare cut into ~4 KB documents at blank lines."""
    from ttt.data import load_documents

    docs = []
    for play in load_documents(None):
        buf: list[str] = []
        size = 0
        for para in re.split(r"\n\s*\n", play.text):
            buf.append(para)
            size += len(para)
            if size >= 4000:
                docs.append("\n\n".join(buf) + "\n")
                buf, size = [], 0
        if buf:
            docs.append("\n\n".join(buf) + "\n")
    return docs


def build_corpus(path: Path, size_bytes: int, seed: int = 0) -> dict[str, Any]:
    """Write a JSONL corpus of at least ``size_bytes`` bytes of text (kept if already there)."""
    meta_path = path.with_suffix(".meta.json")
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("target_bytes") == size_bytes and meta.get("seed") == seed:
            return meta
    docs = _documents()
    rng = random.Random(seed)
    text_bytes, n, copies = 0, 0, 0
    with atomic_open(path, "w", encoding="utf-8") as f:
        while text_bytes < size_bytes:
            order = list(range(len(docs)))
            rng.shuffle(order)
            copies += 1
            for i in order:
                f.write(json.dumps({"text": docs[i]}) + "\n")
                text_bytes += len(docs[i].encode())
                n += 1
                if text_bytes >= size_bytes:
                    break
    meta = {"target_bytes": size_bytes, "seed": seed, "text_bytes": text_bytes,
            "file_bytes": path.stat().st_size,
            "documents": n, "copies_of_shakespeare": copies}
    atomic_write_json(meta_path, meta)
    return meta


def head_corpus(src: Path, dst: Path, size_bytes: int) -> None:
    """The first JSONL lines of ``src`` holding ``size_bytes`` bytes of text."""
    if dst.is_file():
        return
    total = 0
    with open(src, encoding="utf-8") as f, atomic_open(dst, "w", encoding="utf-8") as g:
        for line in f:
            g.write(line)
            total += len(json.loads(line)["text"].encode())
            if total >= size_bytes:
                break


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _pss(pid: int) -> int:
    """Proportional set size: resident memory with pages shared by k processes counted 1/k each."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return _rss(pid)


def run_prepare(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``ttt data prepare ARGS`` in a fresh process; wall time, peak RSS of its process tree, log."""
    cmd = [sys.executable, "-m", "ttt.cli", "data", "prepare", *args]
    peak = {"tree": 0, "largest": 0, "main": 0, "pss": 0}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            pids = _tree(proc.pid)
            rss = {p: _rss(p) for p in pids}
            peak["pss"] = max(peak["pss"], sum(_pss(p) for p in pids))
            peak["tree"] = max(peak["tree"], sum(rss.values()))
            peak["largest"] = max(peak["largest"], max(rss.values(), default=0))
            peak["main"] = max(peak["main"], rss.get(proc.pid, 0))
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err[-2000:]}")
    def seconds(pattern: str, text: str) -> float | None:
        m = re.search(pattern, text)
        return float(m.group(1)) if m else None

    return {"command": " ".join(["ttt", "data", "prepare", *args]), "process_wall_s": wall,
            "prepare_s": seconds(r"wall time of this command: ([0-9.]+) s", out),
            "scan_s": seconds(r"scanned .* in ([0-9.]+) s", err),
            "tokenize_s": seconds(r"tokenized .* in ([0-9.]+) s with", err),
            "cpu_main_s": seconds(r"CPU time of the preparation: ([0-9.]+) s in this process", out),
            "cpu_workers_s": seconds(r"s in this process, ([0-9.]+) s in worker", out),
            "peak_pss_all_processes_mb": peak["pss"] / 1e6,
            "peak_rss_sum_all_processes_mb": peak["tree"] / 1e6,
            "peak_rss_largest_process_mb": peak["largest"] / 1e6, "peak_rss_main_mb": peak["main"] / 1e6,
            "stdout": out.strip()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/ttt-prepare-bench"))
    ap.add_argument("--size-gb", type=float, default=1.0, help="GB of text in the full corpus.")
    ap.add_argument("--bpe-mb", type=float, default=64.0,
                    help="MB of the corpus prepared with the BPE tokenizer.")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--bpe-shard-mb", type=float, default=4.0,
                    help="Shard size of the BPE runs (enough shards to keep every worker busy).")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ns = ap.parse_args(argv)
    from ttt.benchmarks.common import markdown_table, write_results
    from ttt.data import PrepareConfig, prepare_corpus

    work = ns.work_dir
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    corpus = work / "corpus.jsonl"
    meta = build_corpus(corpus, int(ns.size_gb * 1e9))
    print(f"corpus {corpus}: {meta['text_bytes'] / 1e9:.2f} GB of text, {meta['file_bytes'] / 1e9:.2f} GB of "
          f"JSONL, {meta['documents']} documents (built/checked in {time.perf_counter() - t0:.0f} s)")
    bpe_corpus = work / f"head-{ns.bpe_mb:g}mb.jsonl"
    head_corpus(corpus, bpe_corpus, int(ns.bpe_mb * 1e6))
    tok_dir = work / "bpe16k"
    prepare_corpus(PrepareConfig(tokenizer="bpe", vocab_size=16384, workers=1), tok_dir)
    paths = [os.environ.get("PYTHONPATH", ""), *sys.path]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    load_before = os.getloadavg()
    runs = []
    for label, source, tok in (("byte", corpus, "byte"), ("bpe16k", bpe_corpus, str(tok_dir))):
        text_bytes = meta["text_bytes"] if label == "byte" else sum(
            len(json.loads(line)["text"].encode()) for line in open(bpe_corpus, encoding="utf-8"))
        for w in ns.workers:
            out = work / f"out-{label}-{w}"
            shutil.rmtree(out, ignore_errors=True)
            shard_mb = ns.bpe_shard_mb if label == "bpe16k" else 32.0
            r = run_prepare([str(source), "--out", str(out), "--tokenizer", tok, "--workers", str(w),
                             "--shard-mb", f"{shard_mb:g}"], env)
            manifest = json.loads((out / "manifest.json").read_text())
            r.update({"tokenizer": label, "workers": w, "text_mb": text_bytes / 1e6,
                      "tokens": manifest["num_tokens"],
                      "bytes_per_token": text_bytes / manifest["num_tokens"],
                      "mb_per_s": text_bytes / 1e6 / r["prepare_s"],
                      "cpu_s_per_mb": (r["cpu_main_s"] + r["cpu_workers_s"]) / (text_bytes / 1e6),
                      "main_cpu_s_per_mb": r["cpu_main_s"] / (text_bytes / 1e6),
                      "shards": sum(len(s["shards"]) for s in manifest["splits"].values())})
            runs.append(r)
            print(f"{label} x{w}: {r['mb_per_s']:.1f} MB of text/s "
                  f"({r['prepare_s']:.0f} s in prepare_corpus), "
                  f"peak PSS {r['peak_pss_all_processes_mb']:.0f} MB (all processes), "
                  f"peak RSS {r['peak_rss_largest_process_mb']:.0f} MB (largest process)")
            shutil.rmtree(out, ignore_errors=True)
    bpe = {r["workers"]: r for r in runs if r["tokenizer"] == "bpe16k"}
    projection: dict[str, Any] = {}
    for w, r in bpe.items():
        text_mb = RECIPE_TOKENS * r["bytes_per_token"] / 1e6
        projection[f"measured_{w}_workers"] = {"hours": text_mb / r["mb_per_s"] / 3600,
                                               "text_gb": text_mb / 1e3}
    parallel = [r for r in runs if r["workers"] > 1]
    if bpe and parallel:  # CPU cost per MB (independent of the machine's other load), on free cores
        r = bpe[max(bpe)]
        text_mb = RECIPE_TOKENS * r["bytes_per_token"] / 1e6
        main_limit = min(1.0 / x["main_cpu_s_per_mb"] for x in parallel)  # MB/s the main process sustains
        for cores in (2, 8, 16, 64):
            rate = min(cores / r["cpu_s_per_mb"], main_limit)
            projection[f"free_cores_{cores}"] = {"hours": text_mb / rate / 3600, "mb_per_s": rate}
    payload = {
        "benchmark": "prepare_speed",
        "command": "python -m ttt.benchmarks.prepare_speed " + " ".join(argv or sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "note": "shared machine: other jobs were running while this was measured"},
        "corpus": meta,
        "runs": runs,
        "projection_125m_2.5B_tokens": {
            "assumes": "bytes/token of the bpe16k runs; measured_*: their MB/s; free_cores_*: their CPU "
                       "seconds per MB spread over that many idle cores, capped by the MB/s the main process "
                       "sustains (its CPU s per MB in the parallel runs)",
            "projection": projection},
    }
    headers = ["tokenizer", "workers", "text MB", "prepare s", "MB text/s", "scan s", "tokenize s",
               "CPU s main", "CPU s workers", "CPU s / MB", "peak PSS, all processes MB",
               "peak RSS, largest process MB", "peak RSS sum MB", "shards"]
    rows = [[r["tokenizer"], r["workers"], round(r["text_mb"]), r["prepare_s"], r["mb_per_s"], r["scan_s"],
             r["tokenize_s"], r["cpu_main_s"], r["cpu_workers_s"], r["cpu_s_per_mb"],
             round(r["peak_pss_all_processes_mb"]), round(r["peak_rss_largest_process_mb"]),
             round(r["peak_rss_sum_all_processes_mb"]), r["shards"]] for r in runs]
    table = markdown_table(headers, rows)
    write_results("prepare_speed", payload, table, ns.out)
    print(table)
    for k, p in projection.items():
        print(f"projected time to prepare the 125m recipe's 2.5B tokens ({k.replace('_', ' ')}): "
              f"{p['hours']:.2f} h")
    return payload


if __name__ == "__main__":  # pragma: no cover
    main()
