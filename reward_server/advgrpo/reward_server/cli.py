"""``python -m advgrpo.reward_server`` / ``advgrpo-reward-server``: the server's command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

import yaml

from advgrpo.common.errors import ConfigError
from advgrpo.reward_server.auth import TOKEN_ENV, TOKENS_ENV
from advgrpo.reward_server.config import PRESETS, dump_config, load_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="advgrpo-reward-server",
        description="gRPC reward server: PickScore, OCR and a DINOv2 discriminator with online updates.",
    )
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="gRPC port (default 50051; 0 picks a free one)")
    p.add_argument(
        "--http-port", type=int, help="HTTP port for health/metrics/gateway/dashboard (default 8080; 0 picks one)"
    )
    p.add_argument("--no-http", action="store_true", help="serve gRPC only")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="model set: 'toy' (the toy world's discriminator and proxy), 'tiny' (every reward kind, small: toy DINOv2, tiny CLIP, real OCR), both without downloads, or 'sd3-adv' (real model ids); default sd3-adv unless --config is given",
    )
    p.add_argument("--config", type=Path, help="YAML config file, merged over the preset")
    p.add_argument(
        "--backend",
        choices=("single", "ray"),
        default="single",
        help="'single' (default): one process; 'ray': a Ray Serve application (scoring replicas, one "
        "discriminator owner, this front end as its ingress) on a local Ray, or on $RAY_ADDRESS / ray.address; "
        "needs advgrpo-reward-server[ray]",
    )
    p.add_argument(
        "--replicas", type=int, help="--backend ray: scoring replicas of each deployment (ray.replicas, default 1)"
    )
    p.add_argument("--state-dir", type=Path, help="directory where discriminator state is made durable")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument(
        "--auth-token",
        help="one bearer token with the 'update' scope: RPCs need 'authorization: Bearer TOKEN' (also $ADVGRPO_AUTH_TOKEN)",
    )
    p.add_argument(
        "--tokens-file",
        type=Path,
        help="bearer tokens with scopes, one 'TOKEN SCOPE' per line ('#' comments; scope 'score', or 'update' "
        "which also scores); the same lines can come from $ADVGRPO_TOKENS (entries may be separated by commas)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow listening on an address other than loopback with no tokens (refused otherwise)",
    )
    p.add_argument("--tls-cert", type=Path, help="serve gRPC and HTTP over TLS with this PEM certificate chain")
    p.add_argument("--tls-key", type=Path, help="the PEM private key of --tls-cert")
    p.add_argument(
        "--tls-client-ca", type=Path, help="mutual TLS: require client certificates signed by this PEM CA bundle"
    )
    p.add_argument("--max-message-bytes", type=int, help="gRPC message limit (default 64 MiB)")
    p.add_argument("--log-level", help="DEBUG, INFO (default), WARNING, ERROR")
    p.add_argument("--ready-file", type=Path, help="write the ready line (JSON with the ports) to this file")
    p.add_argument("--print-config", action="store_true", help="print the merged config as YAML and exit")
    return p


def config_from_args(args: argparse.Namespace):
    preset = args.preset or (None if args.config else "sd3-adv")
    server: dict = {}
    for key, value in (
        ("host", args.host),
        ("port", args.port),
        ("http_port", args.http_port),
        ("state_dir", str(args.state_dir) if args.state_dir else None),
        ("device", args.device),
        ("auth_token", args.auth_token or os.environ.get(TOKEN_ENV) or None),
        ("tokens_file", str(args.tokens_file) if args.tokens_file else None),
        ("tokens", os.environ.get(TOKENS_ENV) or None),
        ("insecure", True if args.insecure else None),
        ("tls_cert", str(args.tls_cert) if args.tls_cert else None),
        ("tls_key", str(args.tls_key) if args.tls_key else None),
        ("tls_client_ca", str(args.tls_client_ca) if args.tls_client_ca else None),
        ("max_message_bytes", args.max_message_bytes),
        ("log_level", args.log_level),
    ):
        if value is not None:
            server[key] = value
    if args.no_http:
        server["http_port"] = None
    overrides: dict = {"server": server} if server else {}
    if args.replicas is not None:
        if args.backend != "ray":
            raise ConfigError("--replicas: only with --backend ray")
        overrides["ray"] = {"replicas": args.replicas}
    return load_config(preset, args.config, overrides or None)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"advgrpo-reward-server: config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        yaml.safe_dump(dump_config(config), sys.stdout, sort_keys=False)
        return 0
    logging.basicConfig(
        level=config.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from advgrpo.common.library_noise import quiet_torchvision_fallback

    quiet_torchvision_fallback()  # before transformers' image processors load
    if args.backend == "ray":
        try:
            from advgrpo.reward_server.ray_serve import launch
        except ImportError as exc:
            print(
                f"advgrpo-reward-server: --backend ray needs Ray ({exc}); "
                "install it with: pip install 'advgrpo-reward-server[ray]'",
                file=sys.stderr,
            )
            return 2
        try:
            launch.run(config, args.ready_file)
        except ConfigError as exc:
            print(f"advgrpo-reward-server: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # a signal while the application was still deploying
            return 130
        return 0
    from advgrpo.reward_server.server import run  # imports torch & friends: after argument errors are out of the way

    try:
        asyncio.run(run(config, args.ready_file))
    except ConfigError as exc:
        print(f"advgrpo-reward-server: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
