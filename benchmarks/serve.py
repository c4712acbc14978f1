"""Serving under load: the real `llamafactory-cli api` with the shipped projections, at 100% and at a KV budget.

Two servers of the same checkpoint (the embedded SmolLM2-135M-Instruct with the shipped projections,
`embedded-matryoshka`, through scripts/matryoshka_infer.yaml) run side by side on 127.0.0.1, one at
100% and one at --budget, both with MAX_CONCURRENT requests generating at once.  For each number of
concurrent clients (each an `openai` client in its own thread) one server at a time gets --requests
greedy chat completions (the order of the two alternates per level), each a different passage of
held-out speech (2000-2026) of about --prompt-tokens tokens with a question, answered in at most
--max-tokens tokens.  Every response is checked complete: HTTP 200, one choice, a finish reason, and
as many completion tokens as asked for when it stopped for length; anything else, a timeout or a
transport error counts as an error.  Answers are also compared with the same server's answer to the
same passage with one client (`differ`: greedy answers that changed under concurrency).

Memory is the server process's peak resident set, its kernel peak counter reset after start-up and the
one-client answers (so loading does not count) and again before each level.  Both servers serve the same
requests in the same order, so their allocators share one history and the difference of their peaks is
what the budget changes; the cache a level can hold at once (min(clients, MAX_CONCURRENT) x prompt x
the model's bytes per token) is listed beside it.  Each level is bounded by --requests and the whole run
by --time-limit (levels not reached are reported as skipped).

  python -m benchmarks.serve           # full run (about 7 min on 2 cores), docs/data/serve.json + docs section
  python -m benchmarks.serve --quick --model DIR --template default --json OUT.json   # smoke test, no docs
  python -m benchmarks.serve --render-only   # rewrite the docs section from docs/data/serve.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.report import DATA, ROOT, header, markdown_table, write_json, write_section

YAML = ROOT / "scripts" / "matryoshka_infer.yaml"
QUESTION = "In one sentence, what is this passage about?"
MODEL_NAME = "gpt-3.5-turbo"  # what the server lists (API_MODEL_NAME unset)
TITLE = "Serving under load (llamafactory-cli api)"


def passages(model_dir: str, count: int, tokens: int) -> list[str]:
    """`count` different passages of held-out speech, each about `tokens` tokens of the model's tokenizer."""
    from transformers import AutoTokenizer

    from plugin.storage.texts import load_texts

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for text in load_texts(None, split="evaluation"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - tokens + 1, tokens):
            out.append(tokenizer.decode(ids[start:start + tokens], skip_special_tokens=True).strip())
            if len(out) == count:
                return out
    if not out:
        raise ValueError(f"no held-out passage of {tokens} tokens")
    return [out[i % len(out)] for i in range(count)]


def complete(response: Any, max_tokens: int) -> bool:
    """One choice with text and a finish reason; stopped for length only after max_tokens tokens."""
    if response is None or len(response.choices) != 1 or response.usage is None:
        return False
    choice = response.choices[0]
    if not isinstance(choice.message.content, str) or choice.finish_reason not in ("stop", "length"):
        return False
    used = response.usage.completion_tokens
    return used == max_tokens if choice.finish_reason == "length" else 1 <= used <= max_tokens


class Memory:
    """Peak and current resident memory of a server process, with the peak counter reset by /proc/PID/clear_refs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def _field(self, name: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/{self.pid}/status has no {name}")

    def rss(self) -> int:
        return self._field("VmRSS")

    def peak(self) -> int:
        return self._field("VmHWM")

    def reset_peak(self) -> bool:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True


def drive(server: Any, prompts: list[str], clients: int, requests: int, max_tokens: int, deadline: float,
          timeout: float) -> dict[str, Any]:
    """`requests` chat completions from `clients` threads; latencies, errors and answers by prompt index."""
    from openai import OpenAI

    lock = threading.Lock()
    state = {"next": 0}
    records: list[dict[str, Any]] = []

    def worker() -> None:
        client = OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=timeout)
        while True:
            with lock:
                index = state["next"]
                if index >= requests or time.monotonic() > deadline:
                    return
                state["next"] += 1
            prompt = index % len(prompts)
            started = time.perf_counter()
            record: dict[str, Any] = {"prompt": prompt}
            try:
                response = client.chat.completions.create(
                    model=MODEL_NAME, messages=[{"role": "user", "content": f"{prompts[prompt]}\n\n{QUESTION}"}],
                    temperature=0, max_tokens=max_tokens)
                record["ok"] = complete(response, max_tokens)
                record["answer"] = response.choices[0].message.content if response.choices else None
                record["prompt_tokens"] = response.usage.prompt_tokens if response.usage else None
                if not record["ok"]:
                    record["error"] = f"incomplete: {response.model_dump_json()[:300]}"
            except Exception as err:  # noqa: BLE001 - every failure is a counted error, the run goes on
                record["ok"], record["error"] = False, f"{type(err).__name__}: {str(err)[:300]}"
            record["latency"] = time.perf_counter() - started
            with lock:
                records.append(record)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"records": records, "wall": time.perf_counter() - started}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarise(run: dict[str, Any], reference: dict[int, str] | None) -> dict[str, Any]:
    records = run["records"]
    good = [r for r in records if r["ok"]]
    latencies = [r["latency"] for r in good]
    differ = sum(1 for r in good if reference is not None and r["prompt"] in reference
                 and r["answer"] != reference[r["prompt"]])
    errors = [r["error"] for r in records if not r["ok"]]
    return {
        "requests": len(records), "completed": len(good), "errors": len(errors), "error_samples": errors[:3],
        "differ": differ, "wall_s": round(run["wall"], 2),
        "requests_per_s": round(len(good) / run["wall"], 3) if run["wall"] > 0 else None,
        "p50_s": round(percentile(latencies, 0.5), 3) if latencies else None,
        "p95_s": round(percentile(latencies, 0.95), 3) if latencies else None,
        "prompt_tokens": round(statistics.mean(r["prompt_tokens"] for r in good if r.get("prompt_tokens")), 1)
        if any(r.get("prompt_tokens") for r in good) else None,
    }


def cache_bytes_per_token(model_dir: str, budget: float) -> int:
    """float32 cache bytes per token at uniform `budget` ranks, from the checkpoint's shape."""
    from plugin.budgets.ranks import budget_to_rank
    from plugin.storage.loading import kv_shape

    config = json.loads((Path(model_dir) / "config.json").read_text())
    layers, heads, head_dim = kv_shape(config)
    rank = budget_to_rank(budget, head_dim, config.get("kv_rank_step"))
    return 2 * layers * heads * rank * 4


def run(args: argparse.Namespace) -> dict[str, Any]:
    from llamafactory_ext.api_server import ApiServer
    from plugin.storage.loading import checkpoint_dir

    model_dir = str(checkpoint_dir(args.model))  # built once here, not by both servers at start
    levels = [int(n) for n in args.clients.split(",") if n.strip()]
    prompts = passages(model_dir, max(8, max(levels)), args.prompt_tokens)
    budgets = {"100%": 1.0, f"{args.budget:.4g}": args.budget}
    env = {"MAX_CONCURRENT": str(args.max_concurrent)}
    servers = {}
    for label, budget in budgets.items():
        overrides = {"model_name_or_path": model_dir, "matryoshka_kv_budget": budget, "max_new_tokens": args.max_tokens}
        if args.template:
            overrides["template"] = args.template
        log = Path(args.log_dir) / f"serve-{label.rstrip('%')}.log" if args.log_dir else None
        servers[label] = ApiServer(YAML, overrides=overrides, env=env, log_path=log, startup_timeout=600)
    deadline = time.monotonic() + args.time_limit
    result: dict[str, Any] = {"levels": [], "servers": {}}
    try:
        for server in servers.values():
            server.launch()
        for label, server in servers.items():
            server.wait()
            memory = Memory(server.process.pid)
            reference = drive(server, prompts, 1, len(prompts), args.max_tokens, float("inf"), args.request_timeout)
            result["servers"][label] = {
                "budget": budgets[label], "pid": server.process.pid, "rss_after_start": memory.rss(),
                "peak_reset": memory.reset_peak(), "cache_bytes_per_token": cache_bytes_per_token(model_dir, budgets[label]),
                "reference": {r["prompt"]: r.get("answer") for r in reference["records"] if r["ok"]},
                "reference_errors": sum(1 for r in reference["records"] if not r["ok"]),
            }
        for position, clients in enumerate(levels):
            order = list(servers) if position % 2 == 0 else list(reversed(servers))
            for label in order:
                server, info = servers[label], result["servers"][label]
                memory = Memory(server.process.pid)
                idle = memory.rss()
                memory.reset_peak()
                if time.monotonic() > deadline:
                    result["levels"].append({"server": label, "clients": clients, "skipped": "time limit"})
                    continue
                summary = summarise(drive(server, prompts, clients, args.requests, args.max_tokens, deadline,
                                          args.request_timeout), info["reference"])
                peak = memory.peak()
                summary.update(server=label, clients=clients, budget=info["budget"], idle_rss=idle, peak_rss=peak,
                               peak_over_idle=peak - idle,
                               cache_at_once=min(clients, args.max_concurrent) * info["cache_bytes_per_token"]
                               * (summary["prompt_tokens"] or args.prompt_tokens))
                summary["alive"] = server.alive()
                result["levels"].append(summary)
                print(f"{label:>5} x{clients}: {summary['completed']}/{summary['requests']} ok, "
                      f"{summary['requests_per_s']} req/s, p50 {summary['p50_s']} s, p95 {summary['p95_s']} s, "
                      f"errors {summary['errors']}, peak {peak / 2**20:.0f} MiB (+{(peak - idle) / 2**20:.0f})",
                      flush=True)
    finally:
        for server in servers.values():
            server.stop()
    for info in result["servers"].values():
        info["reference"] = {str(k): v for k, v in info["reference"].items()}
    result["meta"] = {
        "model": args.model, "checkpoint": model_dir, "budget": args.budget, "clients": levels,
        "requests_per_level": args.requests, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
        "max_concurrent": args.max_concurrent, "time_limit_s": args.time_limit, "host": "127.0.0.1",
        "total_requests": sum(level.get("requests", 0) for level in result["levels"]),
        "total_errors": sum(level.get("errors", 0) for level in result["levels"])
        + sum(info["reference_errors"] for info in result["servers"].values()),
    }
    return result


def render(result: dict[str, Any]) -> str:
    meta = result["meta"]
    rows = []
    order = {label: index for index, label in enumerate(result["servers"])}
    for level in sorted(result["levels"], key=lambda row: (row["clients"], order[row["server"]])):
        if "skipped" in level:
            rows.append([level["server"], level["clients"], "skipped (time limit)", "", "", "", "", "", ""])
            continue
        mib = 2**20
        rows.append([level["server"], level["clients"], f"{level['completed']}/{level['requests']}",
                     f"{level['requests_per_s']:.2f}", f"{level['p50_s']:.2f}", f"{level['p95_s']:.2f}",
                     f"{level['errors']} / {level['differ']}", f"{level['peak_rss'] / mib:.0f} (+{level['peak_over_idle'] / mib:.0f})",
                     f"{level['cache_at_once'] / mib:.1f}"])
    table = markdown_table(["KV budget", "clients", "complete", "requests/s", "p50 s", "p95 s", "errors / differ",
                            "peak RSS MiB (over idle)", "cache at once MiB"], rows)
    full = next(iter(result["servers"].values()))
    saving = []
    for clients in meta["clients"]:
        peaks = {row["server"]: row for row in result["levels"] if row["clients"] == clients and "skipped" not in row}
        if len(peaks) == 2:
            first, second = (peaks[label] for label in result["servers"])
            saving.append(f"{(first['peak_rss'] - second['peak_rss']) / 2**20:.0f} MiB at {clients} client"
                          f"{'s' if clients > 1 else ''} (cache: {(first['cache_at_once'] - second['cache_at_once']) / 2**20:.0f})")
    second_label = list(result["servers"])[-1]
    answers = [info["reference"] for info in result["servers"].values()]
    same = sum(1 for key, text in answers[0].items() if answers[-1].get(key) == text)
    example = next(iter(answers[0]), None)
    quality = (
        f"The one-client answers of the {second_label} server equal the 100% server's on {same} of {len(answers[0])} "
        f"passages (exact text; greedy), e.g. \"{answers[0][example]}\" at 100% and \"{answers[-1].get(example)}\" at "
        f"{second_label}, the text `model.generate` gives for that passage at those ranks (checked by hand): the "
        "projections' quality on a chat prompt of this length, not the server's (tests/test_llamafactory_serve.py "
        "checks the server against `generate` at the same budget)."
    ) if example is not None else ""
    return (
        meta["header"]
        + f"\nThe real `llamafactory-cli api` (LLaMA-Factory's OpenAI-compatible server, Hugging Face backend) with "
        f"`scripts/matryoshka_infer.yaml`: `{meta['model']}`"
        + (" (the embedded SmolLM2-135M-Instruct with the shipped projections)" if meta["model"] == "embedded-matryoshka"
           else "")
        + f", float32, two servers on 127.0.0.1 in the same run, one at 100% and one at "
        f"`matryoshka_kv_budget: {meta['budget']}`, each with MAX_CONCURRENT={meta['max_concurrent']}. Every request "
        f"is a different passage of held-out speech (about {meta['prompt_tokens']} tokens) and a question, greedy, "
        f"at most {meta['max_tokens']} new tokens, from `openai` clients in threads; {meta['total_requests']} "
        f"requests in the table, {meta['total_errors']} errors. `complete`: responses checked complete (one choice, "
        "a finish reason, all the tokens asked for); `differ`: complete answers that differ from the same server's "
        "one-client answer to the same passage. Peak RSS is the server process's, its peak counter reset after "
        "start-up and before each level; `cache at once` is what MAX_CONCURRENT caches of one prompt hold at the "
        f"server's ranks ({full['cache_bytes_per_token']} bytes/token at 100%).\n\n" + table + "\n\n"
        + f"Peak memory of the 100% server minus the {second_label} server's: " + "; ".join(saving) + ". The resident "
        "set is more than the caches: it also holds what the allocator keeps of earlier requests' transients (after "
        "the same one-client requests, before any level, the two processes already differ by "
        f"{(full['rss_after_start'] - result['servers'][second_label]['rss_after_start']) / 2**20:.0f} MiB); the "
        "`cache at once` column is the exact part.\n\n" + quality + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded-matryoshka",
                        help="what model_name_or_path names (default: the shipped projections on the embedded model)")
    parser.add_argument("--template", default=None, help="LLaMA-Factory template (default: the YAML's, smollm2)")
    parser.add_argument("--budget", type=float, default=0.5, help="KV budget of the second server (default 0.5)")
    parser.add_argument("--clients", default="1,4,8", help="concurrent clients per level (default 1,4,8)")
    parser.add_argument("--requests", type=int, default=32, help="requests per server and level (default 32)")
    parser.add_argument("--prompt-tokens", type=int, default=512,
                        help="tokens of passage per request (default 512, the projections' training length)")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each request (default 16)")
    parser.add_argument("--max-concurrent", type=int, default=8,
                        help="the servers' MAX_CONCURRENT: requests generating at once (default 8)")
    parser.add_argument("--time-limit", type=float, default=540.0, help="seconds for all levels (default 540)")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request (default 300)")
    parser.add_argument("--log-dir", default=None, help="keep the servers' logs here")
    parser.add_argument("--json", default=None, help="write the result here (default docs/data/serve.json)")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the docs section from docs/data/serve.json (or --json) without running anything")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 1 and 2 clients, 4 requests of 32 tokens, nothing written to docs")
    args = parser.parse_args()
    from plugin.budgets.ranks import check_budget

    check_budget(args.budget)
    if args.quick:
        args.clients, args.requests, args.prompt_tokens, args.max_tokens = "1,2", 4, 32, 4
        args.max_concurrent, args.time_limit = 2, min(args.time_limit, 300.0)
    if args.render_only:
        result = json.loads(Path(args.json or DATA / "serve.json").read_text())
        write_section("serve", TITLE, render(result))
        print(render(result))
        return
    command = "python -m benchmarks.serve" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    result = run(args)
    result["meta"]["header"] = header(command)
    write_json(args.json or DATA / "serve.json", result)
    if not args.quick:
        write_section("serve", TITLE, render(result))
    print(render(result))
    if result["meta"]["total_errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
