"""Command line: `python -m llm_batch_dev.simulator --host 127.0.0.1 --port 8765 [options]`."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

from llm_batch_dev.simulator.config import SimulatorConfig
from llm_batch_dev.simulator.http import make_server, serve

API_KEY_ENV = "LLM_SIMULATOR_API_KEY"

logger = logging.getLogger("llm_batch_dev.simulator")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llm_batch_dev.simulator",
        description="Run the local LLM service (batch protocol and OpenAI chat completions).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8765, help="port to listen on (0 = any)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"bearer key clients must send; empty = no auth (default: ${API_KEY_ENV})",
    )
    parser.add_argument(
        "--config-json",
        default="{}",
        help="JSON object of SimulatorConfig settings, e.g. '{\"latency_ms\": 200}'",
    )
    parser.add_argument("--seed", type=int, help="seed for every random choice (overrides config)")
    parser.add_argument("--verbose", action="store_true", help="log one line per request")
    args = parser.parse_args(argv)
    try:
        config = SimulatorConfig.from_json(args.config_json)
        if args.seed is not None:
            config = config.with_changes({"seed": args.seed})
    except ValueError as exc:
        parser.error(f"--config-json: {exc}")
    args.config = config
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        server = make_server(
            args.host, args.port, config=args.config, api_key=args.api_key, verbose=args.verbose
        )
    except OSError as exc:
        logger.error(
            "cannot listen on %s:%s: %s; stop whatever uses that port or pick another --port",
            args.host,
            args.port,
            exc.strerror or exc,
        )
        raise SystemExit(1) from exc
    serve(server)


if __name__ == "__main__":
    main()
