"""``tunefix chat``: one answer (``--prompt``) or a conversation in the terminal."""

from __future__ import annotations

from dataclasses import dataclass

from tunefix.commands.build import positional


@dataclass
class ChatOptions:
    target: str = positional(metavar="MODEL|RUN_DIR|GGUF")
    """a run directory, a Hugging Face model directory or a .gguf file"""
    prompt: str | None = None
    """one-shot: answer this prompt and exit (greedy)"""
    system: str | None = None
    """system prompt (default: the template's)"""
    max_new_tokens: int = 256
    """the longest answer generated, in tokens"""


def run_chat(opts: ChatOptions) -> int:
    from tunefix.chat import open_chat

    bot = open_chat(opts.target)
    try:
        if opts.prompt is not None:
            print(answer_once(bot, opts.prompt, opts.system, opts.max_new_tokens))
        else:
            talk(bot, opts.system, opts.max_new_tokens)
    finally:
        bot.close()
    return 0


def answer_once(bot, prompt: str, system: str | None, max_new_tokens: int) -> str:
    history = [{"role": "system", "content": system}] if system else []
    return bot.answer(history + [{"role": "user", "content": prompt}], max_new_tokens)[0]


def talk(bot, system: str | None, max_new_tokens: int) -> None:
    """Turns until an empty line or end of input; the history grows with each one."""
    from rich.console import Console

    console = Console()
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    console.print("tunefix chat: empty line or Ctrl-D to quit", style="dim")
    while True:
        try:
            line = console.input("[bold]you>[/] ")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        text, stopped = bot.answer(history, max_new_tokens)
        history.append({"role": "assistant", "content": text})
        console.print(f"[bold]model>[/] {text}" + ("" if stopped else " [dim](length limit)[/]"))
