"""Serving a PcaLlama through LLaMA-Factory: `chat`, `api` and `webchat` at a chosen KV budget.

The in-process tests build LLaMA-Factory's own ``ChatModel`` from a dict (what the three commands build from
the YAML) and compare its answers with ``model.generate`` of a PcaLlama loaded apart and set by hand to the
same ranks, bits and eviction.  The slow ones run the real ``llamafactory-cli api`` (127.0.0.1, a free
port) and talk to it with the ``openai`` client, run ``llamafactory-cli chat`` on a piped question, and
check that settings that cannot work stop each command at start with one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

torch = pytest.importorskip("torch")
pytest.importorskip("llamafactory")

from llamafactory_ext import _import_hook
from llamafactory_ext.testing import SENTENCES, build_tiny_chat_pair

_import_hook.install()  # patches the LLaMA-Factory modules even if the .pth is not installed

QUESTION = "what must we build"
LONG_QUESTION = " ".join(SENTENCES)  # about 120 tokens: past a 64-token quantization block and eviction window
NEW_TOKENS = 12
BASE = {"template": "default", "infer_dtype": "float32", "do_sample": False, "max_new_tokens": NEW_TOKENS}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    base, pca = build_tiny_chat_pair(root)
    return {"base": base, "pca": pca, "root": root}


def _chat_model(model: Path, **keys):
    from llamafactory.chat import ChatModel

    return ChatModel({"model_name_or_path": str(model), **BASE, **keys})


def _prompt_ids(chat_model, question: str) -> list[int]:
    engine = chat_model.engine
    ids, _ = engine.template.encode_oneturn(engine.tokenizer, [{"role": "user", "content": question},
                                                                {"role": "assistant", "content": ""}])
    return ids


def _reference(model_dir: Path, prompt_ids: list[int], tokenizer, stop_ids: list[int], new_tokens: int = NEW_TOKENS,
               setup=None, eviction: float = 0.0) -> str:
    """Greedy answer of the model at `model_dir` (set by `setup`), decoded as LLaMA-Factory decodes it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if setup is not None:
        setup(model)
    inputs = torch.tensor([prompt_ids])
    kwargs = {"max_new_tokens": new_tokens, "do_sample": False, "eos_token_id": stop_ids,
              "pad_token_id": tokenizer.pad_token_id, "attention_mask": torch.ones_like(inputs)}
    if eviction:
        from plugin import SnapEviction

        with SnapEviction(eviction)(model):
            out = model.generate(inputs, **kwargs)
    else:
        out = model.generate(inputs, **kwargs)
    return tokenizer.batch_decode(out[:, len(prompt_ids):], skip_special_tokens=True,
                                  clean_up_tokenization_spaces=True)[0]


def _squash(text: str) -> str:
    """The text without spaces: LLaMA-Factory's streamer decodes " ," where its one-shot decode cleans it to ","."""
    return "".join(text.split())


def _answers_like_generate(tiny, question: str, keys: dict, setup, eviction: float = 0.0) -> str:
    chat_model = _chat_model(tiny["pca"], **keys)
    answer = chat_model.chat([{"role": "user", "content": question}])[0]
    engine = chat_model.engine
    expected = _reference(tiny["pca"], _prompt_ids(chat_model, question), engine.tokenizer,
                          engine.template.get_stop_token_ids(engine.tokenizer), setup=setup, eviction=eviction)
    assert answer.response_text == expected
    assert answer.response_length == NEW_TOKENS  # the tiny model never stops early: whole answers are compared
    streamed = "".join(chat_model.stream_chat([{"role": "user", "content": question}]))
    assert _squash(streamed) == _squash(expected)
    return answer.response_text


# ---------------------------------------------------------------------------------------- in process
def test_chat_model_answers_at_the_yaml_budget_as_generate_does(tiny) -> None:
    chat_model = _chat_model(tiny["pca"], matryoshka_kv_budget=0.5)
    pca = chat_model.engine.model
    assert pca.get_kv_ranks() == {"key": [[8, 8], [8, 8]], "value": [[8, 8], [8, 8]]}  # head_dim 16 at 50%
    _answers_like_generate(tiny, QUESTION, {"matryoshka_kv_budget": 0.5}, lambda m: m.set_kv_budget(0.5))


def test_chat_model_with_a_rank_file_carrying_bits(tiny) -> None:
    from plugin.budgets.ranks import write_rank_file

    ranks = {"key": [[16, 8], [4, 12]], "value": [[8, 8], [16, 4]]}
    path = write_rank_file(tiny["root"] / "ranks.json", ranks, 16, key_bits=[[4, 8], [4, 4]],
                           value_bits=[[2, 4], [8, 16]])
    chat_model = _chat_model(tiny["pca"], matryoshka_rank_file=str(path))
    assert chat_model.engine.model.get_kv_ranks() == ranks
    assert chat_model.engine.model.get_kv_bits().key_bits == ((4, 8), (4, 4))
    _answers_like_generate(tiny, LONG_QUESTION, {"matryoshka_rank_file": str(path)},
                           lambda m: m.load_rank_file(path))


def test_chat_model_with_bits_and_eviction_per_request(tiny) -> None:
    keys = {"matryoshka_kv_budget": 0.75, "matryoshka_kv_bits": "4/2", "matryoshka_eviction_ratio": 0.5}

    def setup(model) -> None:
        model.set_kv_budget(0.75)
        model.set_kv_bits(4, 2)

    _answers_like_generate(tiny, LONG_QUESTION, keys, setup, eviction=0.5)
    # Attached for the engine's life, it evicts at every request's prefill: half the prompt enters the cache.
    from plugin import SnapEviction

    chat_model = _chat_model(tiny["pca"], **keys)
    pca, ids = chat_model.engine.model, _prompt_ids(chat_model, LONG_QUESTION)
    assert all([hook.__self__ for hook in attn.kv_hooks()] == [SnapEviction(0.5)] for attn in pca.attention_layers())
    for _ in range(2):  # a second request evicts as the first did
        with torch.no_grad():
            cache = pca(input_ids=torch.tensor([ids]), use_cache=True).past_key_values
        assert cache.get_seq_length() == SnapEviction(0.5).kept(len(ids)) < len(ids)


def test_inference_keys_with_bad_values_name_the_key(tiny) -> None:
    from llamafactory.hparams import get_infer_args

    model = {"model_name_or_path": str(tiny["pca"]), "template": "default"}
    cases = [
        ({"matryoshka_kv_budget": 1.5}, "`matryoshka_kv_budget`: budget 1.5 is outside"),
        ({"matryoshka_kv_budget": "half"}, "`matryoshka_kv_budget`: budget 'half' is not a number"),
        ({"matryoshka_kv_bits": "3"}, "`matryoshka_kv_bits` (keys) must be one of 2, 4, 8 or 16"),
        ({"matryoshka_eviction_ratio": 1.0}, "`matryoshka_eviction_ratio` is the share"),
        ({"matryoshka_kv_budget": 0.5, "matryoshka_rank_file": "r.json"}, "not both"),
        ({"matryoshka_kv_budjet": 0.5}, "did you mean `matryoshka_kv_budget`"),
        ({"matryoshka_rank_file": str(tiny["root"] / "missing.json")}, "does not exist"),
    ]
    for keys, message in cases:
        with pytest.raises(ValueError, match=_literal(message)):
            get_infer_args({**model, **keys})


def test_a_rank_file_of_another_shape_is_refused_before_loading(tiny) -> None:
    from llamafactory.hparams import get_infer_args

    from plugin.budgets.ranks import write_rank_file

    three_layers = write_rank_file(tiny["root"] / "three.json", {"key": [[8, 8]] * 3, "value": [[8, 8]] * 3}, 16)
    with pytest.raises(ValueError, match="3 layers|n_layers|layers"):
        get_infer_args({"model_name_or_path": str(tiny["pca"]), "matryoshka_rank_file": str(three_layers)})
    with_bits = write_rank_file(tiny["root"] / "bits.json", {"key": [[8, 8]] * 2, "value": [[8, 8]] * 2}, 16,
                                key_bits=[[4, 4]] * 2, value_bits=[[4, 4]] * 2)
    with pytest.raises(ValueError, match="carries its own bit widths"):
        get_infer_args({"model_name_or_path": str(tiny["pca"]), "matryoshka_rank_file": str(with_bits),
                        "matryoshka_kv_bits": "8"})


def test_other_backends_and_plain_models_are_refused_naming_what_works(tiny) -> None:
    from llamafactory.hparams import get_infer_args

    for backend in ("vllm", "sglang"):
        for keys in ({"matryoshka_kv_budget": 0.5}, {}):  # the keys, or a PcaLlama checkpoint alone
            with pytest.raises(ValueError, match=f"`infer_backend: {backend}`.*`infer_backend: huggingface`.*because"):
                get_infer_args({"model_name_or_path": str(tiny["pca"]), "infer_backend": backend, **keys})
    with pytest.raises(ValueError, match="need a PcaLlama checkpoint"):
        get_infer_args({"model_name_or_path": str(tiny["base"]), "matryoshka_kv_budget": 0.5})
    model_args, *_ = get_infer_args({"model_name_or_path": str(tiny["base"])})  # a plain Llama alone is served as is
    assert model_args.model_name_or_path == str(tiny["base"])


def _literal(text: str) -> str:
    import re

    return re.escape(text)


# ---------------------------------------------------------------------------------------- real processes
BIN = Path(sys.executable).parent
CLI = BIN / "llamafactory-cli"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", DISABLE_VERSION_CHECK="1",
               API_HOST="127.0.0.1")
    for key in ("ALLOW_EXTRA_ARGS", "MKV_DISABLE_LLAMAFACTORY_HOOK", "API_KEY", "API_MODEL_NAME"):
        env.pop(key, None)
    return env


def _yaml(tiny, name: str, **keys) -> Path:
    path = tiny["root"] / f"{name}.yaml"
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in
                            {"model_name_or_path": str(tiny["pca"]), **BASE, **keys}.items()))
    return path


@pytest.fixture(scope="module")
def servers(tiny):
    """Two real `llamafactory-cli api` servers of the tiny PcaLlama, at 100% and at 50%, started together."""
    from llamafactory_ext.api_server import ApiServer

    full = ApiServer(_yaml(tiny, "full", matryoshka_kv_budget=1.0), env=_env(), startup_timeout=300)
    half = ApiServer(_yaml(tiny, "half", matryoshka_kv_budget=0.5), env=_env(), startup_timeout=300)
    try:
        full.launch()
        half.launch()
        yield {"full": full.wait(), "half": half.wait()}
    finally:
        full.stop()
        half.stop()


def _client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def _ask(server, question: str, stream: bool = False) -> tuple[str, str | None]:
    messages = [{"role": "user", "content": question}]
    client = _client(server)
    if not stream:
        response = client.chat.completions.create(model="gpt-3.5-turbo", messages=messages, temperature=0,
                                                  max_tokens=NEW_TOKENS)
        choice = response.choices[0]
        assert response.usage.completion_tokens == NEW_TOKENS
        return choice.message.content, choice.finish_reason
    chunks = list(client.chat.completions.create(model="gpt-3.5-turbo", messages=messages, temperature=0,
                                                 max_tokens=NEW_TOKENS, stream=True))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    return text, chunks[-1].choices[0].finish_reason


def _expected(tiny, model_dir: Path, question: str, setup=None) -> str:
    chat_model = _chat_model(tiny["pca"])  # the same template and tokenizer as the servers
    engine = chat_model.engine
    return _reference(model_dir, _prompt_ids(chat_model, question), engine.tokenizer,
                      engine.template.get_stop_token_ids(engine.tokenizer), setup=setup)


@pytest.mark.slow
def test_api_at_full_budget_answers_as_the_base_model(tiny, servers) -> None:
    expected = _expected(tiny, tiny["base"], QUESTION)  # the plain Llama the PcaLlama was made from
    assert _ask(servers["full"], QUESTION) == (expected, "length")
    text, finish = _ask(servers["full"], QUESTION, stream=True)
    assert (_squash(text), finish) == (_squash(expected), "stop")  # LLaMA-Factory ends every stream with "stop"


@pytest.mark.slow
def test_api_at_the_configured_budget_answers_as_generate_at_that_budget(tiny, servers) -> None:
    expected = _expected(tiny, tiny["pca"], QUESTION, setup=lambda m: m.set_kv_budget(0.5))
    assert expected != _expected(tiny, tiny["base"], QUESTION)  # 50% really differs here
    assert _ask(servers["half"], QUESTION) == (expected, "length")
    text, finish = _ask(servers["half"], QUESTION, stream=True)
    assert (_squash(text), finish) == (_squash(expected), "stop")  # LLaMA-Factory ends every stream with "stop"
    # Concurrent clients get the same answers as one alone.
    answers: list = []
    threads = [threading.Thread(target=lambda: answers.append(_ask(servers["half"], QUESTION))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert answers == [(expected, "length")] * 4


def _post(server, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"{server.base_url}/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.slow
def test_malformed_requests_get_error_responses_and_the_server_keeps_serving(tiny, servers) -> None:
    server = servers["half"]
    good = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
            "max_tokens": 4}
    cases = [
        (b'{"model": "gpt-3.5-turbo", "messages": [', 422, "JSON decode error"),
        (json.dumps({**good, "model": "gpt-4"}).encode(), 404, "is not served here"),
        (json.dumps({**good, "messages": []}).encode(), 400, "messages is empty"),
        (json.dumps({**good, "messages": [], "stream": True}).encode(), 400, "messages is empty"),
        (json.dumps({**good, "max_tokens": 100_000}).encode(), 400, "exceed the model's context of 256 tokens"),
        (json.dumps({**good, "max_tokens": 100_000, "stream": True}).encode(), 400, "exceed the model's context"),
        (json.dumps({**good, "max_tokens": 0}).encode(), 400, "max_tokens must be at least 1"),
    ]
    for body, status, detail in cases:
        code, payload = _post(server, body)
        assert code == status, (body, payload)
        assert detail in json.dumps(payload), payload
        code, payload = _post(server, json.dumps(good).encode())  # the next request is served
        assert code == 200 and payload["usage"]["completion_tokens"] == 4, payload
    assert server.alive()


@pytest.mark.slow
def test_llamafactory_cli_chat_answers_at_the_budget(tiny) -> None:
    yaml = _yaml(tiny, "chat", matryoshka_kv_budget=0.5)
    proc = subprocess.run([str(CLI), "chat", str(yaml)], input=f"{QUESTION}\nexit\n", capture_output=True,
                          text=True, timeout=300, env=_env(), cwd=str(tiny["root"]), check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    expected = _expected(tiny, tiny["pca"], QUESTION, setup=lambda m: m.set_kv_budget(0.5))
    assert _squash(f"Assistant: {expected}") in _squash(proc.stdout)
    assert "Matryoshka inference: KV budget 0.5" in proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("command", "keys", "message"), [
    ("api", {"matryoshka_kv_budget": 0}, "`matryoshka_kv_budget`: budget 0 is outside (0, 1]"),
    ("chat", {"infer_backend": "vllm", "matryoshka_kv_budget": 0.5}, "`infer_backend: huggingface`"),
    ("webchat", {"matryoshka_kv_bits": "5"}, "`matryoshka_kv_bits` (keys) must be one of 2, 4, 8 or 16"),
], ids=["api-budget", "chat-vllm", "webchat-bits"])
def test_commands_refuse_settings_that_cannot_work_with_one_line(tiny, command, keys, message) -> None:
    yaml = _yaml(tiny, f"bad-{command}", **keys)
    proc = subprocess.run([str(CLI), command, str(yaml)], capture_output=True, text=True, timeout=300, env=_env(),
                          stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("matryoshka-kv: error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_a_projections_artifact_is_served_from_a_checkpoint_written_once(tiny, tmp_path, monkeypatch) -> None:
    """model_name_or_path may name projections as `mkv` does (the YAML's `embedded-matryoshka` takes this path)."""
    from llamafactory.hparams import get_infer_args
    from transformers import AutoModelForCausalLM

    from plugin.storage.artifacts import save_projections

    monkeypatch.setenv("MKV_CACHE_DIR", str(tmp_path / "cache"))
    artifact = save_projections(AutoModelForCausalLM.from_pretrained(tiny["pca"]), tmp_path / "projections",
                                base_model=str(tiny["base"]))
    model_args, *_ = get_infer_args({"model_name_or_path": str(artifact), "template": "default"})
    checkpoint = Path(model_args.model_name_or_path)
    assert checkpoint.parent == tmp_path / "cache" / "checkpoints" and (checkpoint / "config.json").is_file()
    built = (checkpoint / "model.safetensors").stat().st_mtime_ns
    again, *_ = get_infer_args({"model_name_or_path": str(artifact), "template": "default"})
    assert again.model_name_or_path == str(checkpoint)
    assert (checkpoint / "model.safetensors").stat().st_mtime_ns == built  # written once
    served = _chat_model(artifact, matryoshka_kv_budget=0.5).chat([{"role": "user", "content": QUESTION}])[0]
    direct = _chat_model(tiny["pca"], matryoshka_kv_budget=0.5).chat([{"role": "user", "content": QUESTION}])[0]
    assert served.response_text == direct.response_text


@pytest.mark.slow
def test_the_shipped_yaml_answers_a_question_at_its_budget() -> None:
    """`llamafactory-cli chat scripts/matryoshka_infer.yaml` on the embedded model with the shipped projections."""
    proc = subprocess.run([str(CLI), "chat", str(REPO / "scripts" / "matryoshka_infer.yaml"), "max_new_tokens=12"],
                          input="What is the capital of France?\nexit\n", capture_output=True, text=True, timeout=600,
                          env=_env(), cwd=str(REPO), check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "Matryoshka inference: KV budget 0.5 (ranks 32/64, 16-bit)" in log
    assert "cache 23040 bytes/token vs 46080 full (0.500)" in log  # SmolLM2-135M: 30 layers x 3 KV heads x 64
    assert "Paris" in proc.stdout.split("Assistant:", 1)[1]


@pytest.mark.slow
def test_serve_benchmark_quick_drives_two_real_servers(tiny, tmp_path) -> None:
    out = tmp_path / "serve.json"
    env = _env()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.serve", "--quick", "--model", str(tiny["pca"]),
                           "--template", "default", "--json", str(out)], capture_output=True, text=True, timeout=600,
                          env=env, cwd=str(REPO), check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads(out.read_text())
    assert result["meta"]["total_errors"] == 0 and result["meta"]["host"] == "127.0.0.1"
    rows = {(row["server"], row["clients"]): row for row in result["levels"]}
    assert set(rows) == {(server, clients) for server in ("100%", "0.5") for clients in (1, 2)}
    for row in rows.values():
        assert row["completed"] == row["requests"] == 4 and row["errors"] == 0 and row["differ"] == 0 and row["alive"]
        assert row["requests_per_s"] > 0 and 0 < row["p50_s"] <= row["p95_s"] and row["peak_rss"] > 0
    # Cache bytes from the model's shape: 2 (K, V) x 2 layers x 2 KV heads x rank x 4 bytes.
    assert result["servers"]["100%"]["cache_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert result["servers"]["0.5"]["cache_bytes_per_token"] == 2 * 2 * 2 * 8 * 4
