"""`tandem bench serve` with `vllm bench serve`'s options against a live server (the
OpenAI API over a real engine on the embedded model, tests/cluster/conftest.py), with
the random dataset and a small ShareGPT file written here."""

from __future__ import annotations

import json

import pytest

from cluster.bench_metrics import parse_goodput
from cluster.cli import main

SERVED = "tandem-default"


def bench(url: str, *args: str) -> int:
    return main(["bench", "serve", "--base-url", url, "--api-key", "sekret", "--disable-tqdm", *args])


def test_random_dataset_with_vllms_options_saves_vllms_keys(api_server, tmp_path, capsys):
    url, _ = api_server
    args = ["--backend", "openai", "--endpoint", "/v1/completions", "--dataset-name", "random",
            "--random-input-len", "16", "--random-output-len", "4", "--random-range-ratio", "0.5",
            "--num-prompts", "6", "--request-rate", "50", "--burstiness", "0.5", "--max-concurrency", "2",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99", "--seed", "1",
            "--ignore-eos", "--save-result", "--result-dir", str(tmp_path)]
    assert bench(url, *args, "--goodput", "ttft:60000", "tpot:60000", "e2el:60000",
                 "--result-filename", "loose.json") == 0
    table = capsys.readouterr().out
    for row in ("Successful requests:", "Maximum request concurrency:", "Request goodput (req/s):",
                "Median TTFT (ms):", "P50 ITL (ms):", "P99 E2EL (ms):"):
        assert row in table, table
    loose = json.loads((tmp_path / "loose.json").read_text())
    assert loose["completed"] == 6 and loose["failed"] == 0
    assert len(loose["output_lens"]) == 6 and all(2 <= n <= 6 for n in loose["output_lens"])
    assert loose["total_output_tokens"] == sum(loose["output_lens"])
    assert all(8 <= n <= 24 for n in loose["input_lens"]) and len(set(loose["input_lens"])) > 1
    assert loose["request_goodput"] == pytest.approx(loose["request_throughput"])   # every request is good
    for key in ("duration", "request_throughput", "output_throughput", "total_token_throughput", "ttfts", "itls",
                "mean_ttft_ms", "median_tpot_ms", "std_itl_ms", "p50_e2el_ms", "p99_ttft_ms"):
        assert key in loose, key
    assert loose["max_concurrency"] == 2 and loose["burstiness"] == 0.5 and loose["model_id"] == SERVED
    assert loose["p99_e2el_ms"] >= loose["p50_e2el_ms"] > 0

    # An SLO nothing can meet: no goodput (the count can fail).
    assert bench(url, *args, "--goodput", "ttft:0", "--result-filename", "tight.json") == 0
    assert json.loads((tmp_path / "tight.json").read_text())["request_goodput"] == 0


def write_sharegpt(path) -> list[tuple[str, str]]:
    turns = [("What is a mixture of experts?", "A layer that routes each token to a few expert networks."),
             ("Name three colours.", "Red, green and a shade of blue."),
             ("Say hello in French.", "Bonjour, et bienvenue à tous."),
             ("Count to five.", "One, two, three, four, five.")]
    data = [{"id": str(i), "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
            for i, (q, a) in enumerate(turns)]
    data.append({"id": "lonely", "conversations": [{"from": "human", "value": "no reply to this one"}]})
    path.write_text(json.dumps(data))
    return turns


def test_sharegpt_file_on_the_chat_backend(api_server, tmp_path):
    from engine.default_model import default_model_path
    from engine.tokenizer import load_tokenizer

    url, _ = api_server
    turns = write_sharegpt(tmp_path / "sharegpt.json")
    tokenizer = load_tokenizer(default_model_path())
    reply_lens = sorted(len(tokenizer.encode(a, add_special_tokens=False)) for _, a in turns)
    out = tmp_path / "chat.json"
    assert bench(url, "--backend", "openai-chat", "--dataset-name", "sharegpt", "--dataset-path",
                 str(tmp_path / "sharegpt.json"), "--num-prompts", "4", "--ignore-eos", "--max-concurrency", "2",
                 "--save-result", "--result-filename", str(out)) == 0
    result = json.loads(out.read_text())
    assert result["completed"] == 4 and result["failed"] == 0
    assert sorted(result["output_lens"]) == reply_lens      # each request asked for its reply's length
    assert all(text for text in result["generated_texts"]) and all(n > 0 for n in result["input_lens"])
    assert result["request_goodput"] is None                # no --goodput given, as in vLLM

    with pytest.raises(SystemExit, match="only 4 usable conversations"):
        bench(url, "--dataset-name", "sharegpt", "--dataset-path", str(tmp_path / "sharegpt.json"),
              "--num-prompts", "5")


def test_old_spellings_still_work(api_server, tmp_path):
    url, _ = api_server
    out = tmp_path / "old.json"
    assert bench(url, "--num-prompts", "3", "--request-rate", "20", "--input-len", "8", "--output-len", "3",
                 "--slo-ttft-ms", "60000", "--slo-itl-ms", "60000", "--result-json", str(out)) == 0
    result = json.loads(out.read_text())
    assert result["completed"] == 3 and result["output_lens"] == [3, 3, 3] and result["input_lens"] == [8, 8, 8]
    assert result["goodput_slos_ms"] == {"ttft": 60000, "tpot": 60000} and result["request_goodput"] > 0


@pytest.mark.parametrize(("items", "message"), [(["itl:50"], "itl:50"), (["ttft=5"], "KEY:MS"),
                                                (["ttft:fast"], "not a number")])
def test_goodput_refuses_what_vllm_refuses(items, message):
    with pytest.raises(SystemExit, match=message):
        parse_goodput(items)


def test_help_gives_every_option_a_line_and_its_default():
    import argparse

    from cluster.cli import parser

    commands = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    bench_commands = next(a for a in commands.choices["bench"]._actions if isinstance(a, argparse._SubParsersAction))
    serve = bench_commands.choices["serve"]
    for action in serve._actions:
        if not isinstance(action, argparse._HelpAction):
            assert action.help and "(default: " in action.help, action.option_strings
    text = serve.format_help()
    for flag in ("--backend", "--endpoint", "--dataset-name", "--dataset-path", "--random-input-len",
                 "--random-output-len", "--random-range-ratio", "--num-prompts", "--request-rate", "--burstiness",
                 "--max-concurrency", "--goodput", "--percentile-metrics", "--metric-percentiles", "--save-result",
                 "--result-dir", "--result-filename", "--seed", "--ignore-eos", "--input-len", "--result-json"):
        assert flag in text, flag
