"""Load on a real ``kvtrim serve`` process (embedded model by default), measured in one run:

- time to first token for a document the store holds (from memory, and from disk after a
  restart) against a new document that must be prefilled and compressed;
- requests/s and p50 / p95 latency with 1, 4 and 8 concurrent clients on stored documents, with
  the server's batching (requests waiting on one context decoded together, ``--max-batch 8``) and
  without it (``--max-batch 1``: one request after another);
- KV bytes held in memory against ``--memory-budget`` after more documents than fit;
- the store's write and read speed (MB/s of the session folder, checksums included).

Not a test. Run it alone (``OMP_NUM_THREADS`` as the server's threads):

    python benchmarks/serve_load.py [--model smollm2-135m] [--tokens 2048] [--spec lagkv@0.5+lukv]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import openai

from kvtrim.core.spec import DEFAULT_SPEC
from kvtrim.serve.process import Server


def documents(n: int, tokens: int) -> list[str]:
    """``n`` different documents of about ``tokens`` tokens (4 characters each) from the bundled essays."""
    text = (Path(__file__).resolve().parents[1] / "src/kvtrim/data/essays.txt").read_text(encoding="utf-8")
    size = tokens * 4
    return [text[i * size // 3 : i * size // 3 + size] for i in range(n)]


def ask(
    client: openai.OpenAI, model: str, document: str, question: str, max_tokens: int
) -> tuple[float, float, dict]:
    """(time to first token, total latency, usage) of one streamed chat request."""
    start = time.perf_counter()
    first = None
    usage: dict = {}
    stream = client.chat.completions.create(
        model=model,
        temperature=0,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "system", "content": document}, {"role": "user", "content": question}],
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
    total = time.perf_counter() - start
    return (first if first is not None else total), total, usage


def load_level(client, model, docs, clients: int, requests: int, max_tokens: int) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()

    def work(worker: int) -> None:
        for i in range(worker, requests, clients):
            _, total, _ = ask(client, model, docs[i % len(docs)], f"Summarise part {i}.", max_tokens)
            with lock:
                latencies.append(total)

    start = time.perf_counter()
    threads = [threading.Thread(target=work, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ordered = sorted(latencies)
    return {
        "clients": clients,
        "requests": len(latencies),
        "requests_per_s": len(latencies) / wall,
        "p50_s": statistics.median(ordered),
        "p95_s": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
    }


def metric(server: Server, name: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(server.url + "/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--spec", default=DEFAULT_SPEC)
    parser.add_argument("--tokens", type=int, default=2048, help="document length (approximate)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args()

    docs = documents(6, args.tokens)
    root = Path(tempfile.mkdtemp(prefix="kvtrim-serve-load-"))
    store = root / "store"
    base = ("--spec", args.spec, "--max-tokens", str(args.max_tokens), "--queue-size", "64")
    figures: dict = {"model": args.model, "spec": args.spec, "tokens": args.tokens}
    server = Server(args.model, store, *base, threads=args.threads).start(timeout_s=600)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    try:
        ask(client, args.model, "warm-up " * 40, "Hello?", 2)  # first-call costs (kernels, calibration)
        new = [ask(client, args.model, d, "What is this about?", args.max_tokens) for d in docs[:3]]
        memory = [ask(client, args.model, d, "Who wrote it?", args.max_tokens) for d in docs[:3]]
        figures["context_tokens"] = new[0][2]["kvtrim"]["context_tokens"]
        figures["ttft_new_s"] = statistics.median(r[0] for r in new)
        figures["ttft_memory_s"] = statistics.median(r[0] for r in memory)
        levels = [
            load_level(client, args.model, docs[:3], c, args.requests, args.max_tokens) for c in (1, 4, 8)
        ]
        figures["load"] = levels
        server.stop()
        server = Server(args.model, store, *base, "--max-batch", "1", threads=args.threads).start(600)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
        figures["load_unbatched"] = [
            load_level(client, args.model, docs[:3], c, args.requests, args.max_tokens) for c in (1, 4, 8)
        ]
        server.stop()
        server = Server(args.model, store, *base, threads=args.threads).start(timeout_s=600)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
        disk = [ask(client, args.model, d, "Where was it written?", args.max_tokens) for d in docs[:3]]
        assert all(r[2]["kvtrim"]["source"] == "store" for r in disk)
        figures["ttft_store_s"] = statistics.median(r[0] for r in disk)
        server.stop()
        one = new[0][2]["kvtrim"]["kv_bytes_after"]
        budget = int(one * 2.5)
        server = Server(args.model, store, *base, "--memory-budget", str(budget), threads=args.threads).start(
            600
        )
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
        for d in docs:
            ask(client, args.model, d, "Name one place.", 4)
        figures["memory_budget"] = budget
        figures["kv_bytes_held"] = metric(server, "kvtrim_kv_bytes_held")
    finally:
        server.stop()
    figures.update(store_speed(args.model, docs[0], args.spec, root / "speed-store"))
    print_table(figures)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(figures, indent=1))


def store_speed(model_name: str, document: str, spec: str, root: Path) -> dict:
    """Write and read speed of the store for one compressed session (in this process)."""
    import kvtrim
    from kvtrim.models.fingerprint import model_fingerprint
    from kvtrim.store import ContextStore, context_key

    model, tokenizer = kvtrim.load_model(model_name)
    session = kvtrim.compress(model, tokenizer, document, spec=spec)
    store = ContextStore(root)
    key = context_key(model_fingerprint(model), spec, [0])
    start = time.perf_counter()
    entry = store.put(key, session, model_fingerprint(model), spec)
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    assert store.load(key, model, tokenizer) is not None
    read_s = time.perf_counter() - start
    mb = entry.disk_bytes / 1e6
    return {"store_entry_mb": mb, "store_write_mb_s": mb / write_s, "store_read_mb_s": mb / read_s}


def print_table(f: dict) -> None:
    print(f"\nkvtrim serve, {f['model']}, {f['spec']}, documents of {f['context_tokens']} tokens")
    print("| time to first token | s | vs new |\n|---|---:|---:|")
    for label, key in (
        ("new document (prefill + compress)", "ttft_new_s"),
        ("stored, in memory", "ttft_memory_s"),
        ("stored, from disk after a restart", "ttft_store_s"),
    ):
        print(f"| {label} | {f[key]:.3f} | {f['ttft_new_s'] / f[key]:.1f}x |")
    print("\n| clients | batching | requests | requests/s | p50 s | p95 s |\n|---:|---|---:|---:|---:|---:|")
    for label, key in (("--max-batch 8", "load"), ("--max-batch 1", "load_unbatched")):
        for level in f[key]:
            print(
                f"| {level['clients']} | {label} | {level['requests']} | {level['requests_per_s']:.2f} | "
                f"{level['p50_s']:.3f} | {level['p95_s']:.3f} |"
            )
    print(
        f"\nKV bytes held {f['kv_bytes_held'] / 2**20:.1f} MiB "
        f"with --memory-budget {f['memory_budget'] / 2**20:.1f} MiB"
    )
    print(
        f"store: entry {f['store_entry_mb']:.1f} MB, write {f['store_write_mb_s']:.0f} MB/s, "
        f"read (verified) {f['store_read_mb_s']:.0f} MB/s"
    )


if __name__ == "__main__":
    main()
