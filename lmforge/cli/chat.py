"""`lmforge chat`: a multi-turn conversation with a chat model, answers streamed as they appear.

Each turn re-renders the whole history (system prompt, user and assistant messages)
through the model's chat template and generates the assistant's next message: the model
itself remembers nothing between turns, the prompt carries the conversation. When it
outgrows the context window, --context chooses what is sent: full (everything, until it no
longer fits), truncate (the oldest exchanges dropped), window (the last --window-turns
exchanges, or at most --window-tokens tokens), summarize (the model writes a running summary
of the older exchanges, its tokens reported) or state (the model keeps a JSON object of the facts
stated, sent with every message, and only the last --window-turns exchanges go word for word); the
system prompt and the latest message always go, and /save keeps the whole conversation.
--max-tokens is reserved for each answer. --reasoning switches a thinking model's reasoning off
or caps it at N tokens.
With --rag INDEX (from `lmforge rag index`), each message retrieves --rag-top-k passages that go
into it as numbered sources for the model to cite as [n]; the sources sent are listed on stderr.
Lines starting with / are commands (/help lists them); Ctrl-C stops an answer, Ctrl-D leaves.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable

from lmforge.cli.common import (
    add_model_argument,
    add_quantization_argument,
    add_sampling_arguments,
    load_generator,
    note,
    report,
    sampling_params,
    write_answer,
)
from lmforge.context import CONDENSING
from lmforge.context.reasoning import reasoning_template_vars
from lmforge.context.strategies import (
    STRATEGIES,
    ContextPolicy,
    SelectedContext,
    select_context,
)
from lmforge.errors import InputError, LMForgeError, UnsupportedError
from lmforge.generation.chat import ChatHistory
from lmforge.generation.sampling_params import SamplingParams

EXAMPLES = """examples:
  lmforge chat
  lmforge chat --system "Answer in one sentence." --temperature 0.3 --max-tokens 100
  printf 'Hi!\\n/save chat.json\\n' | lmforge chat --temperature 0 > answers.txt
  lmforge chat --context window --window-turns 4     # send only the last 4 exchanges
  lmforge chat --context state --window-turns 1      # pinned facts + the last exchange
  lmforge chat --rag docs.index --rag-top-k 3        # answers from your documents, citing them
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("chat", help="chat with a model in the terminal (multi-turn, streamed)",
                                   description=__doc__ + "\n" + COMMAND_HELP, epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser)
    add_quantization_argument(parser)
    parser.add_argument("--system", metavar="TEXT", help="system prompt (change it later with /system)")
    context = parser.add_argument_group("context (what is sent when the conversation outgrows the window)")
    context.add_argument("--context", choices=(*STRATEGIES, *CONDENSING), default="full",
                         help="full: everything; truncate: drop the oldest exchanges; window: the last ones; "
                              "summarize: the model summarizes the older exchanges; state: the model keeps the "
                              "facts stated as JSON (default: full)")
    context.add_argument("--window-turns", type=int, metavar="N",
                         help="window: the last N exchanges; summarize/state: exchanges kept word for word "
                              "(default: 2 for summarize, 1 for state)")
    context.add_argument("--window-tokens", type=int, metavar="T", help="window/truncate: at most T prompt tokens")
    context.add_argument("--rag", metavar="INDEX", help="retrieve passages for each message from this index "
                                                        "(written by `lmforge rag index`) and send them as sources")
    context.add_argument("--rag-top-k", type=int, default=4, metavar="K",
                         help="--rag: passages retrieved per message (default: 4)")
    parser.add_argument("--reasoning", type=reasoning_option, metavar="off|N",
                        help="thinking models: switch reasoning off, or allow at most N thinking tokens per answer")
    add_sampling_arguments(parser)
    parser.set_defaults(handler=handle)


def reasoning_option(value: str) -> str | int:
    if value == "off":
        return value
    try:
        budget = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'off' or a number of tokens, got {value!r}") from None
    if budget < 0:
        raise argparse.ArgumentTypeError(f"the reasoning budget must be >= 0 tokens, got {budget}")
    return budget


# ----- commands: each takes the history and the text after the command, returns False to leave ------

def _reset(history: ChatHistory, argument: str) -> bool:
    history.reset()
    note("conversation cleared (the system prompt stays)")
    return True


def _save(history: ChatHistory, argument: str) -> bool:
    history.save(_path(argument, "/save"))
    note(f"saved {len(history.messages)} messages to {argument}")
    return True


def _load(history: ChatHistory, argument: str) -> bool:
    loaded = ChatHistory.load(_path(argument, "/load"))
    history.system, history.messages = loaded.system, loaded.messages
    note(f"loaded {len(history.messages)} messages from {argument}"
         + (" (with its system prompt)" if history.system else ""))
    return True


def _system(history: ChatHistory, argument: str) -> bool:
    history.set_system(argument)
    note(f"system prompt set to {argument!r}" if argument else "system prompt removed (the template's default applies)")
    return True


def _help(history: ChatHistory, argument: str) -> bool:
    print(COMMAND_HELP, file=sys.stderr)
    return True


def _exit(history: ChatHistory, argument: str) -> bool:
    return False


def _path(argument: str, command: str) -> str:
    if not argument:
        raise InputError(f"{command} needs a file name, e.g. {command} chat.json")
    return argument


COMMANDS: dict[str, tuple[Callable[[ChatHistory, str], bool], str]] = {
    "/reset": (_reset, "forget the conversation (keeps the system prompt)"),
    "/save": (_save, "FILE  save the conversation as JSON"),
    "/load": (_load, "FILE  continue a saved conversation (lmforge or OpenAI-style JSON)"),
    "/system": (_system, "TEXT  set the system prompt; without TEXT, remove it"),
    "/help": (_help, "show these commands"),
    "/exit": (_exit, "leave (so do Ctrl-D, and Ctrl-C at the prompt)"),
}
COMMAND_HELP = "commands:\n" + "\n".join(f"  {name:8} {text}" for name, (_, text) in COMMANDS.items())


def run_command(history: ChatHistory, line: str) -> bool:
    """Execute one /command; False means leave the chat."""
    name, _, argument = line.partition(" ")
    if name not in COMMANDS:
        raise InputError(f"unknown command {name}; type /help for the list.")
    return COMMANDS[name][0](history, argument.strip())


# ----- the conversation loop ----------------------------------------------------------------

def handle(args: argparse.Namespace) -> int:
    params = sampling_params(args)  # bad values fail before the model loads
    if isinstance(args.reasoning, int):
        params = dataclasses.replace(params, reasoning_budget=args.reasoning)
    if args.context in CONDENSING and args.window_tokens is not None:
        raise InputError(f"--window-tokens applies to the truncate and window strategies, not {args.context}.")
    policy = None if args.context in CONDENSING else ContextPolicy(args.context, args.window_turns,
                                                                    args.window_tokens, params.max_tokens or 0)
    retriever = _retriever(args.rag, args.rag_top_k)  # a missing index fails before the model loads
    model, tokenizer = load_generator(args.model, args.quantization, args.adapter)
    if not tokenizer.chat_template:
        raise UnsupportedError(f"{args.model} has no chat template, so it cannot hold a conversation; use a chat "
                               f"model, or complete plain text with: lmforge generate --raw --model {args.model} TEXT")
    template_vars = reasoning_template_vars(tokenizer, args.reasoning)  # no thinking mode: fails here
    history = ChatHistory(system=args.system)
    select = context_selector(model, tokenizer, args.context, policy, params.max_tokens or 0, args.window_turns)
    if retriever is not None:
        select = retrieval_selector(retriever, select, args.rag_top_k)
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (arrow keys and line history for input() at a terminal)

        note("type a message and press Enter; /help lists the commands, Ctrl-D leaves")
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)  # the prompt marker stays off stdout
        try:
            line = input().strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, end of piped input, or Ctrl-C at the prompt
            if interactive:
                print(file=sys.stderr)
            return 0
        if not line:
            continue
        try:
            if line.startswith("/"):
                if not run_command(history, line):
                    return 0
            else:
                answer_turn(model, tokenizer, history, line, params, select, template_vars)
        except LMForgeError as exc:  # a bad command or a turn that cannot run: report it and keep chatting
            print(f"lmforge: error: {exc}", file=sys.stderr)


def context_selector(model, tokenizer, strategy: str, policy: ContextPolicy | None, reserve: int,
                     keep_turns: int | None) -> Callable[[ChatHistory], SelectedContext]:
    """What each turn sends: `policy`'s part of the history, or for summarize / state the older exchanges
    condensed by the model and the last `keep_turns` word for word (what the model kept noted when it changes)."""
    window = model.config.context_length
    if policy is not None:
        return lambda history: select_context(history, tokenizer, window, policy)
    context = CONDENSING[strategy](model, tokenizer, reserve, **({"keep_turns": keep_turns} if keep_turns else {}))
    if strategy == "summarize":
        return lambda history: context.select(history, window)

    def select_with_state(history: ChatHistory) -> SelectedContext:
        before = dict(context.state)
        selected = context.select(history, window)
        if context.state != before:
            note(f"facts: {json.dumps(context.state, ensure_ascii=False)} (model calls so far: "
                 f"{context.spent.prompt} prompt + {context.spent.generated} generated tokens)")
        return selected

    return select_with_state


def _retriever(index: str | None, top_k: int):
    if index is None:
        return None
    if top_k < 1:
        raise InputError(f"--rag-top-k must be >= 1, got {top_k}.")
    from lmforge.context.rag import Retriever

    return Retriever.load(index)


def retrieval_selector(retriever, select: Callable[[ChatHistory], SelectedContext],
                       top_k: int) -> Callable[[ChatHistory], SelectedContext]:
    """`select` with the `top_k` passages retrieved for the latest message put into it as numbered sources;
    the sources sent are listed on stderr."""
    from lmforge.context.rag import RetrievedContext

    context = RetrievedContext(retriever, select, top_k)

    def select_with_sources(history: ChatHistory) -> SelectedContext:
        selected = context.select(history)
        sources = ", ".join(f"[{number}] {p.chunk.source} ({p.score:.2f})"
                            for number, p in enumerate(selected.passages, 1))
        note(f"sources: {sources}" if sources else "sources: none fit the context window")
        return selected

    return select_with_sources


def answer_turn(model, tokenizer, history: ChatHistory, message: str, params: SamplingParams,
                select: Callable[[ChatHistory], SelectedContext], template_vars: dict) -> None:
    """Add the user's message, stream the assistant's answer and add it too (even when cut by Ctrl-C).
    The prompt is the part of the history `select` chooses (`context_selector`), rendered with
    `template_vars` (e.g. the thinking switch)."""
    history.add_user(message)
    try:
        selected = select(history)
        if selected.dropped_messages:
            note(f"context: {selected.tokens} tokens sent, the {selected.dropped_messages} oldest message(s) left out "
                 "or summarized")
        prompt_ids = tokenizer.encode(selected.history.to_prompt(tokenizer, **template_vars),
                                      add_special_tokens=False)
        answer = write_answer(model, tokenizer, prompt_ids, params, interruptible=True)
    except LMForgeError:
        history.messages.pop()  # the turn did not happen
        raise
    print(flush=True)  # answers end with a newline, one after another on stdout
    history.add_assistant(answer.text)
    report(answer, tokenizer)
