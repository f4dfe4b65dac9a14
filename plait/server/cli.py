"""The ``plait`` command: ``serve`` an HTTP API, or ``generate`` / ``chat`` one-offs offline.

plait serve --model-path default --port 30000
plait generate "The capital of France is" --max-new-tokens 16
plait chat "Tell me a joke"        # one message; without it, an interactive session
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Iterable, TextIO

from plait.server.cli_flags import add_engine_args, add_serve_args
from plait.server.server_args import ServerArgs, from_namespace


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plait", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_args(sub.add_parser("serve", help="serve the OpenAI and SGLang HTTP APIs"))
    gen = sub.add_parser("generate", help="complete one prompt and print it")
    gen.add_argument("prompt")
    chat = sub.add_parser("chat", help="chat through the model's chat template")
    chat.add_argument("message", nargs="?", help="send one message and exit")
    chat.add_argument("--system", default=None, help="system prompt")
    for p in (gen, chat):
        add_engine_args(p)
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=0.0)
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=None)
    return parser


def _engine(args: ServerArgs) -> Any:
    import plait
    from plait.server.scheduler_process import kv_budget_from_fraction

    model_path = args.resolved_model_path()
    return plait.Engine(**kv_budget_from_fraction(args.engine_kwargs(model_path)))


def _sampling(ns: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_new_tokens": ns.max_new_tokens,
        "temperature": ns.temperature,
        "top_p": ns.top_p,
        "seed": ns.seed,
    }


def _print_stream(chunks: Iterable[dict[str, Any]], out: TextIO) -> str:
    """Print cumulative-text chunks as they grow; returns the final text."""
    shown = ""
    for chunk in chunks:
        text = chunk.get("text", "")
        out.write(text[len(shown) :])
        out.flush()
        shown = text if len(text) >= len(shown) else shown
    out.write("\n")
    return shown


def cmd_generate(ns: argparse.Namespace) -> int:
    engine = _engine(from_namespace(ns))
    try:
        sys.stdout.write(ns.prompt)
        _print_stream(
            engine.generate(prompt=ns.prompt, sampling_params=_sampling(ns), stream=True),
            sys.stdout,
        )
    finally:
        engine.shutdown()
    return 0


def cmd_chat(ns: argparse.Namespace) -> int:
    engine = _engine(from_namespace(ns))
    messages: list[dict[str, str]] = []
    if ns.system:
        messages.append({"role": "system", "content": ns.system})
    interactive = ns.message is None
    try:
        while True:
            if interactive:
                try:
                    line = input(">>> ")
                except EOFError:
                    break
                if line.strip() in ("/exit", "/quit"):
                    break
                if not line.strip():
                    continue
            else:
                line = ns.message
            messages.append({"role": "user", "content": line})
            ids = engine.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            ids = engine.tokenizer.encode(ids, add_special_tokens=False)
            reply = _print_stream(
                engine.generate(input_ids=ids, sampling_params=_sampling(ns), stream=True),
                sys.stdout,
            )
            messages.append({"role": "assistant", "content": reply})
            if not interactive:
                break
    finally:
        engine.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.command == "serve":
        args = from_namespace(ns)
        try:
            args.validate()
        except ValueError as e:
            build_parser().error(str(e))
        if args.pd is not None:
            from plait.server.pd_launcher import run_pd

            return run_pd(args)
        if args.dp > 1:
            from plait.server.data_parallel import run_data_parallel

            return run_data_parallel(args)
        from plait.server.http_server import run_server

        return run_server(args)
    if ns.command == "generate":
        return cmd_generate(ns)
    return cmd_chat(ns)


if __name__ == "__main__":
    sys.exit(main())
