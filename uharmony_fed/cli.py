"""The ``uharmony-fed`` command: one CLI, one subcommand per job.

Every command defaults to the embedded demo federation config. Errors in configs, data
or arguments end in one line naming the file or key and the fix, with exit code 2 (bad
config or arguments) or 1 (bad data, failed run).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn
from dataclasses import replace
from pathlib import Path

from uharmony_fed.checkpoint import CorruptFileError
from uharmony_fed.config import ConfigError
from uharmony_fed.data.errors import DataError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    def deco(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = fn
        return fn

    return deco


def _config(args: argparse.Namespace):
    from uharmony_fed.fedconfig import load_config

    return load_config(getattr(args, "config", None))


@command("make-demo")
def cmd_make_demo(args: argparse.Namespace) -> int:
    import time

    from uharmony_fed.demo import make_demo

    start = time.perf_counter()
    paths = make_demo(Path(args.out), sites=args.sites, cases=args.cases, seed=args.seed, joiner=args.joiner)
    print(f"wrote {len(paths)} sites in {time.perf_counter() - start:.1f} s:")
    for p in paths:
        print(f"  {p}")
    return 0


@command("check-data")
def cmd_check_data(args: argparse.Namespace) -> int:
    from uharmony_fed.data import check_data, format_report, load_site_config

    site = None
    if args.site_config:
        site = replace(load_site_config(args.site_config), data_dir=Path(args.data).resolve())
    report = check_data(Path(args.data), layout=args.layout, site=site)
    print(format_report(report))
    return 0 if report.ok else 1


@command("plan")
def cmd_plan(args: argparse.Namespace) -> int:
    from uharmony_fed.policy import format_plan, plan_all

    cfg = _config(args)
    table = plan_all(cfg.model)
    if args.json:
        print(json.dumps(table, indent=2))
    else:
        print(f"model: {cfg.model.arch}, norm {cfg.model.norm}; configured policy: {cfg.federation.policy}")
        print(format_plan(table))
    return 0


@command("simulate")
def cmd_simulate(args: argparse.Namespace) -> int:
    from uharmony_fed.fed.launch import simulate
    from uharmony_fed.report import write_run_report

    cfg = _config(args)
    result = simulate(cfg, Path(args.run_dir) if args.run_dir else None, resume=args.resume)
    if result.returncode != 0:
        print(f"simulation failed (exit {result.returncode}); logs in {result.run_dir / 'logs'}",
              file=sys.stderr)
        return 1
    pictures = write_run_report(result.run_dir)
    print(f"\nfinished in {result.seconds:.0f} s; run folder {result.run_dir}")
    for p in pictures:
        print(f"  {p}")
    return 0


@command("server")
def cmd_server(args: argparse.Namespace) -> int:
    from uharmony_fed.fed.launch import serve
    from uharmony_fed.report import write_run_report

    cfg = _config(args)
    result = serve(cfg, Path(args.run_dir) if args.run_dir else None, resume=args.resume,
                   insecure=args.insecure)
    if result.returncode != 0:
        print(f"run failed (exit {result.returncode}); logs in {result.run_dir / 'logs'}", file=sys.stderr)
        return 1
    write_run_report(result.run_dir)
    return 0


@command("client")
def cmd_client(args: argparse.Namespace) -> int:
    from uharmony_fed.fed.launch import run_site

    cfg = _config(args)
    site_config = Path(args.site_config) if args.site_config else cfg.site_config_path(args.site)
    server = args.server or f"127.0.0.1:{cfg.server.port}"
    certs = cfg.server.certs_dir
    ca = None if args.insecure else Path(args.ca) if args.ca else certs / "ca.crt"
    key = None if args.insecure else Path(args.key) if args.key else certs / "sites" / f"{args.site}.key"
    for path, flag in ((ca, "--ca"), (key, "--key")):
        if path is not None and not path.is_file():
            msg = f"{path} not found; pass {flag} (made by 'uharmony-fed certs') or --insecure"
            raise FileNotFoundError(msg)
    if key is not None and not cfg.server.supernode_auth:
        key = None
    return run_site(args.site, site_config, server, ca_cert=ca, key=key, port=args.port, threads=args.threads)


@command("bench")
def cmd_bench(args: argparse.Namespace) -> int:
    from uharmony_fed import bench

    return bench.run(args)


@command("certs")
def cmd_certs(args: argparse.Namespace) -> int:
    from uharmony_fed.certs import enrolment_help, make_certs

    cfg = _config(args)
    sites = args.sites or list(cfg.sites)
    make_certs(Path(args.out), hosts=args.host, sites=sites, force=args.force)
    print(enrolment_help(Path(args.out), sites, f"{args.host[0]}:{cfg.server.port}"))
    return 0


@command("train")
def cmd_train(args: argparse.Namespace) -> int:
    import datetime as dt

    from uharmony_fed.local_train import train_site

    cfg = _config(args)
    site_config = Path(args.site_config) if args.site_config else cfg.site_config_path(args.site)
    if not site_config.is_file():
        from uharmony_fed.fed.launch import ensure_demo

        ensure_demo(cfg)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / f"{cfg.name}-local-{site_config.parent.name}-{stamp}"
    train_site(cfg, site_config, run_dir)
    print(f"run folder {run_dir}; predict with: uharmony-fed predict --model {run_dir} "
          f"--site-config {site_config} --input CASE --output seg.nii.gz")
    return 0


@command("predict")
def cmd_predict(args: argparse.Namespace) -> int:
    from uharmony_fed.predict import predict_to_files

    if getattr(args, "universal", False):
        return _predict_universal(args)
    res = predict_to_files(args.model, args.site_config, args.input, args.output, overlay=args.overlay,
                           label=args.label, threshold=args.threshold, device=args.device)
    counts = ", ".join(f"{v}: {n:,}" for v, n in sorted(res.label_counts.items()))
    print(f"{res.case_id}: wrote {res.output} (federation {res.federation}, policy {res.policy}; "
          f"voxels per label {counts})")
    if res.overlay is not None:
        print(f"  overlay {res.overlay}")
    return 0


def _predict_universal(args: argparse.Namespace) -> int:
    """``predict --universal``: segment with a universal model (no site id)."""
    from uharmony_fed.predict import predict_universal_to_files

    res = predict_universal_to_files(args.model, args.site_config, args.input, args.output,
                                     overlay=args.overlay, label=args.label, threshold=args.threshold,
                                     device=args.device)
    counts = ", ".join(f"{v}: {n:,}" for v, n in sorted(res.label_counts.items()))
    gate = ", ".join(f"{s} {w:.2f}" for s, w in sorted((res.gate or {}).items(), key=lambda kv: -kv[1]))
    print(f"{res.case_id}: wrote {res.output} (universal model of federation {res.federation}; "
          f"gate {gate}; voxels per label {counts})")
    if res.overlay is not None:
        print(f"  overlay {res.overlay}")
    return 0


@command("export")
def cmd_export(args: argparse.Namespace) -> int:
    from uharmony_fed.universal import export_site, load_export

    if not (args.site or args.site_config):
        raise ValueError("give --site NAME (a site of --config) or --site-config site.yaml")
    site_config = Path(args.site_config) if args.site_config else _config(args).site_config_path(args.site)
    out_path = args.out or f"{args.site or site_config.parent.name}.export.pt"
    out = export_site(args.model, site_config, out_path, device=args.device)
    doc = load_export(out)
    n = sum(t.numel() for t in doc["params"].values())
    print(f"site {doc['site']}: wrote {out} ({len(doc['params'])} restore/head tensors, {n:,} values; "
          f"domain descriptor of {doc['descriptor']['count']} training cases; no voxels, file names or case ids)")
    return 0


@command("assemble")
def cmd_assemble(args: argparse.Namespace) -> int:
    from uharmony_fed.universal import assemble

    out = assemble(args.model, args.exports, args.out, temperature=args.temperature)
    print(f"wrote {out}: universal model of {len(args.exports)} sites; predict with: uharmony-fed predict "
          f"--universal --model {out} --site-config SITE.yaml --input CASE --output seg.nii.gz")
    return 0


class _Parser(argparse.ArgumentParser):
    """An argument parser whose mistakes end in one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand (``--help`` explains each)."""
    p = _Parser(
        prog="uharmony-fed",
        description="Federated 3-D brain lesion segmentation with U-Harmony normalization on Flower. "
        "Every command defaults to the demo federation (configs/demo.yaml).",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_)

    def with_config(q: argparse.ArgumentParser) -> None:
        q.add_argument("--config", help="run config YAML (default: the embedded demo federation)")

    q = add("make-demo", "generate the demo federation: heterogeneous hospitals on MNI152 anatomy")
    q.add_argument("--out", default="demo_data", help="output folder (default: demo_data)")
    q.add_argument("--sites", type=int, default=3, help="number of hospitals (default 3)")
    q.add_argument("--cases", type=int, default=8, help="cases per hospital (default 8)")
    q.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    q.add_argument("--joiner", action="store_true",
                   help="also write hospitalNew, a hospital to join a running federation with: another "
                        "scanner, only T1c and FLAIR, post-operative cases with its own class RC (label 4)")

    q = add("check-data", "list every case of a site's data and every problem with its fix")
    q.add_argument("--data", required=True, help="the site's data folder")
    q.add_argument("--layout", choices=["auto", "brats", "msd", "datalist"], default="auto")
    q.add_argument("--site-config", help="the site's site.yaml (label and modality mapping)")

    q = add("plan", "show what each sharing policy would send per round (tensors, parameters, bytes)")
    with_config(q)
    q.add_argument("--json", action="store_true", help="print JSON keyed by policy name")

    q = add("simulate", "run the federation on Flower's simulation engine on this machine")
    with_config(q)
    q.add_argument("--run-dir", help="run folder (default runs/<name>-<timestamp>)")
    q.add_argument("--resume", action="store_true", help="continue the run in --run-dir")

    q = add("server", "coordinator: start Flower's SuperLink and run the federation")
    with_config(q)
    q.add_argument("--run-dir", help="run folder (default runs/<name>-<timestamp>)")
    q.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --run-dir")
    q.add_argument("--insecure", action="store_true", help="no TLS and no site keys (local trials only)")

    q = add("client", "hospital: start this site's SuperNode and train when the server asks")
    with_config(q)
    q.add_argument("--site", required=True, help="this site's name, e.g. hospitalA")
    q.add_argument("--site-config", help="the site's site.yaml (default <data_root>/<site>/site.yaml)")
    q.add_argument("--server", help="the coordinator's HOST:PORT (default 127.0.0.1:<server.port>)")
    q.add_argument("--ca", help="CA certificate that signed the server (default <certs_dir>/ca.crt)")
    q.add_argument("--key", help="this site's private key (default <certs_dir>/sites/<site>.key)")
    q.add_argument("--port", type=int, default=0, help="local SuperNode port (default: a free one)")
    q.add_argument("--threads", type=int, default=0,
                   help="CPU threads for training (default: all; use 1 when several sites share one machine)")
    q.add_argument("--insecure", action="store_true", help="no TLS and no site key (local trials only)")

    q = add("certs", "make a development CA, server certificate and site keys")
    with_config(q)
    q.add_argument("--out", default="certs", help="output folder (default certs)")
    q.add_argument("--host", action="append", default=None,
                   help="server host name or IP for the certificate (repeatable; default localhost, 127.0.0.1)")
    q.add_argument("--sites", nargs="*", help="site names to make keys for (default: the config's sites)")
    q.add_argument("--force", action="store_true",
                   help="replace an existing CA and server certificate (every site then needs the new ca.crt)")

    q = add("train", "train one site alone, without a federation (checks data and model end to end)")
    with_config(q)
    q.add_argument("--site", default="hospitalA", help="a site of the config (default hospitalA)")
    q.add_argument("--site-config", help="the site's site.yaml (default <data_root>/<site>/site.yaml)")
    q.add_argument("--run-dir", help="run folder (default runs/<name>-local-<site>-<timestamp>)")

    q = add("predict", "segment one case with a site's federated model (shared arrays + the site's local part)")
    q.add_argument("--model", required=True, help="a finished run folder or its final_shared.ckpt")
    q.add_argument("--site-config", required=True,
                   help="the predicting site's site.yaml (its local state, modalities and label values)")
    q.add_argument("--input", required=True,
                   help="a BraTS case folder (CASE-t1n.nii.gz ...), a 4-D NIfTI (one sequence per channel: the "
                   "site's channel indices, else FLAIR,T1w,T1gd,T2w), a 3-D CASE-<sequence>.nii.gz, or a "
                   "case id of the site's data")
    q.add_argument("--output", required=True, help="segmentation to write (.nii.gz; the case's grid, the site's labels)")
    q.add_argument("--overlay", help="also write a PNG of axial slices with the predicted regions")
    q.add_argument("--label", help="ground truth to outline in the overlay (default: the case's own, if any)")
    q.add_argument("--threshold", type=float, default=0.5, help="region probability threshold (default 0.5)")
    q.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: GPU when present")
    q.add_argument("--universal", action="store_true",
                   help="--model is a universal model (uharmony-fed assemble): no site id, a domain gate "
                   "picks the sites' restorations; --site-config then only maps sequences and label values")

    q = add("export", "opt-in: write this site's restore and head parameters and domain statistics "
            "(no voxels, file names or case ids) for a universal model")
    with_config(q)
    q.add_argument("--site", help="this site's name in the config (its site.yaml is <data_root>/<site>/site.yaml)")
    q.add_argument("--site-config", help="this site's site.yaml (its local state and training data); or --site")
    q.add_argument("--model", required=True, help="the finished run folder (or its final_shared.ckpt)")
    q.add_argument("--out", help="the export file to write (default <site>.export.pt)")
    q.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu", help="default: cpu")

    q = add("assemble", "build one universal model from a run and the sites' exports")
    q.add_argument("--model", required=True, help="the finished run folder (or its final_shared.ckpt)")
    q.add_argument("--exports", nargs="+", required=True, help="one export file per site")
    q.add_argument("--out", required=True, help="the universal model file to write (e.g. universal.pt)")
    q.add_argument("--temperature", type=float, default=1.0,
                   help="gate temperature: smaller picks one site more sharply (default 1.0)")

    from uharmony_fed import bench

    bench.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``uharmony-fed``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "host", "unset") is None:
        args.host = ["localhost", "127.0.0.1"]
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    # A service manager stops us with SIGTERM: exit through Python's unwinding, so the Flower
    # processes a command started (SuperLink, SuperNode) are stopped with it, not orphaned.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"uharmony-fed {args.command}: config error: {exc}", file=sys.stderr)
        return 2
    except (DataError, CorruptFileError) as exc:
        print(f"uharmony-fed {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as exc:
        print(f"uharmony-fed {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
