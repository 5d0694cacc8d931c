"""Deployment files without a docker engine: compose, Dockerfiles, systemd units and example configs."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from uharmony_fed.cli import COMMANDS, build_parser
from uharmony_fed.config import load_yaml, parse
from uharmony_fed.data import SiteConfig
from uharmony_fed.fedconfig import load_config

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
SERVICES: dict[str, dict] = COMPOSE["services"]
SITES = ("hospitalA", "hospitalB", "hospitalC")


def parse_cli(argv: list[str]):
    """Parse a ``uharmony-fed`` command line (without the program name) as the CLI would."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on an unknown subcommand or flag
        raise AssertionError(f"not a valid uharmony-fed command line: {argv}") from exc
    assert args.command in COMMANDS
    return args


def dockerfile(service: dict) -> Path:
    build = service["build"]
    return DOCKER / build["context"] / build.get("dockerfile", "Dockerfile")


def instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, rest)`` pairs of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def exec_form(path: Path, word: str) -> list[str]:
    values = [rest for w, rest in instructions(path) if w == word]
    return json.loads(values[-1]) if values else []


def argv_of(service: dict) -> list[str]:
    """What a service's container runs: its entry point and command (compose overrides the image)."""
    entry = service.get("entrypoint", exec_form(dockerfile(service), "ENTRYPOINT"))
    command = service.get("command", exec_form(dockerfile(service), "CMD"))
    entry = shlex.split(entry) if isinstance(entry, str) else list(entry)
    command = shlex.split(command) if isinstance(command, str) else list(command)
    return entry + command


def test_services():
    assert {"certs", "demo", "server", *SITES} <= set(SERVICES)


@pytest.mark.parametrize("name", list(SERVICES))
def test_build_context_and_dockerfile_exist(name):
    service = SERVICES[name]
    assert (DOCKER / service["build"]["context"]).resolve() == ROOT
    assert dockerfile(service).is_file()


@pytest.mark.parametrize("name", list(SERVICES))
def test_volumes_exist(name):
    declared = set(COMPOSE.get("volumes") or {})
    for spec in SERVICES[name].get("volumes", []):
        source = spec.split(":")[0]
        if source.startswith((".", "/")):
            assert (DOCKER / source).exists(), f"{name}: {source} is not in the repository"
        else:
            assert source in declared, f"{name}: volume {source!r} is not declared"


@pytest.mark.parametrize("name", list(SERVICES))
def test_commands_are_real_subcommands(name):
    argv = argv_of(SERVICES[name])
    assert argv[0] == "uharmony-fed", argv
    parse_cli(argv[1:])


def _mounted(service: dict, container_path: str) -> bool:
    for spec in service.get("volumes", []):
        target = spec.split(":")[1]
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return True
    return False


def test_the_demo_federation_wiring():
    cfg = load_config(DOCKER / "fed.yaml")
    certs = parse_cli(argv_of(SERVICES["certs"])[1:])
    assert certs.out == str(cfg.server.certs_dir) and "server" in certs.host
    demo = parse_cli(argv_of(SERVICES["demo"])[1:])
    assert Path(demo.out) == cfg.data_root and demo.sites == len(cfg.sites)
    server = parse_cli(argv_of(SERVICES["server"])[1:])
    assert server.command == "server" and not server.insecure
    assert f"{cfg.server.port}:{cfg.server.port}" in SERVICES["server"]["ports"]
    for site in cfg.sites:
        service = SERVICES[site]
        args = parse_cli(argv_of(service)[1:])
        assert (args.command, args.site, args.insecure) == ("client", site, False)
        assert args.server == f"server:{cfg.server.port}"
        assert args.ca == f"{cfg.server.certs_dir}/ca.crt"
        assert args.key == f"{cfg.server.certs_dir}/sites/{site}.key"
        assert args.site_config == f"{cfg.data_root}/{site}/site.yaml"
        for path in (args.config, args.ca, args.key, args.site_config):
            assert _mounted(service, path), f"{site}: nothing is mounted at {path}"
        deps = service["depends_on"]
        assert deps["certs"]["condition"] == deps["demo"]["condition"] == "service_completed_successfully"
    for path in (server.config, str(cfg.server.certs_dir)):
        assert _mounted(SERVICES["server"], path)


def test_docker_fed_yaml_is_the_demo_with_container_paths():
    cfg = load_config(DOCKER / "fed.yaml")
    assert cfg.data_root == Path("/data") and cfg.server.certs_dir == Path("/certs")
    demo = load_config(ROOT / "configs" / "demo.yaml")
    server = dataclasses.replace(cfg.server, certs_dir=demo.server.certs_dir)
    assert dataclasses.replace(cfg, data_root=demo.data_root, server=server) == demo


@pytest.mark.parametrize("name", ["Dockerfile.server", "Dockerfile.site"])
def test_dockerfiles_copy_only_what_exists(name):
    path = DOCKER / name
    steps = instructions(path)
    assert steps[0] == ("FROM", "python:3.11-slim")
    runs = " ; ".join(rest for w, rest in steps if w == "RUN")
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in runs
    assert runs.index("torch==2.13.0") < runs.index("pip install .")
    allowed = [ln[1:].rstrip("/") for ln in (DOCKER / f"{name}.dockerignore").read_text().splitlines()
               if ln.startswith("!")]
    copies = [shlex.split(rest) for w, rest in steps if w == "COPY"]
    assert copies
    for words in copies:
        sources = [w for w in words[:-1] if not w.startswith("--")]
        for src in sources:
            assert (ROOT / src).exists(), f"{name}: COPY {src} does not exist"
            assert src.rstrip("/") in allowed, f"{name}: {src} is excluded by {name}.dockerignore"


def test_server_image_default_command():
    argv = exec_form(DOCKER / "Dockerfile.server", "ENTRYPOINT") + exec_form(DOCKER / "Dockerfile.server", "CMD")
    args = parse_cli(argv[1:])
    assert (args.command, args.config) == ("server", "/config/fed.yaml")


def test_site_image_entrypoint_builds_a_client_command(tmp_path):
    assert exec_form(DOCKER / "Dockerfile.site", "ENTRYPOINT") == ["uharmony-fed-site"]
    fake = tmp_path / "uharmony-fed"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "SITE": "hospitalB"}
    out = subprocess.run(["sh", str(DOCKER / "site-entrypoint.sh"), "--port", "9999"], env=env,
                         capture_output=True, text=True, check=True, timeout=20).stdout
    args = parse_cli(out.splitlines())
    assert (args.command, args.site, args.port) == ("client", "hospitalB", 9999)
    assert (args.key, args.site_config) == ("/certs/sites/hospitalB.key", "/data/hospitalB/site.yaml")


# ---------------------------------------------------------------------- operator kits


def test_kits_are_not_packages():
    for kit in ("server", "client"):
        assert (ROOT / kit / "README.md").is_file()
        assert not list((ROOT / kit).rglob("*.py")), f"{kit}/ must hold no Python modules"


@pytest.mark.parametrize("unit", ["server/uharmony-fed-server.service", "client/uharmony-fed-site.service"])
def test_systemd_units_run_real_commands(unit):
    lines = (ROOT / unit).read_text().splitlines()
    assert "[Service]" in lines and "[Install]" in lines
    exec_start = [ln.split("=", 1)[1] for ln in lines if ln.startswith("ExecStart=")]
    assert len(exec_start) == 1
    argv = shlex.split(exec_start[0])
    assert Path(argv[0]).name == "uharmony-fed"
    args = parse_cli(argv[1:])
    if args.command == "client":
        assert not args.insecure and args.ca and args.key and args.site_config and args.server
    else:
        assert args.command == "server" and not args.insecure and args.resume


def test_example_configs_parse():
    cfg = load_config(ROOT / "configs" / "brats.yaml")
    assert cfg.demo is None and cfg.server.supernode_auth and not cfg.server.insecure
    site = parse(SiteConfig, load_yaml(ROOT / "client" / "site.yaml"), "client/site.yaml")
    assert site.name in cfg.sites and site.layout == "brats"
