"""`tandem serve`: deploy the app on Ray (a local instance unless told to join one), print
where every page is, and take everything down again on Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from cluster.serve_args import app_args

PAGES = (("OpenAI API", "/v1", "try: curl {base}/v1/models"),
         ("API docs", "/docs", "every route, with a form to call it"),
         ("metrics", "/metrics", "Prometheus text, tandem_* series"),
         ("dashboard", "/dashboard", "goodput, TTFT, ITL, KV cache, live"),
         ("health", "/health", "200 once the engines answer"))


def banner(name: str, mode: str, base: str, ray_address: str, local: bool) -> str:
    lines = [f"Tandem is serving {name} ({mode}) on {base}"]
    lines += [f"  {title:<11}: {base}{path:<11} {hint.format(base=base)}" for title, path, hint in PAGES]
    if local:
        lines.append(f"  Ray        : a local instance at {ray_address}, with Ray's token authentication "
                     "(token: $RAY_AUTH_TOKEN or ~/.ray/auth_token); it stops with this command")
    else:
        lines.append(f"  Ray        : the cluster at {ray_address}; only this app is removed on exit")
    lines.append("Ctrl-C stops it.")
    return "\n".join(lines)


class _DropNotice(logging.Filter):
    """Drops one of Ray's notices that reads like trouble but is normal; the banner says
    the same in plain words."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_ray_logs() -> None:
    """Serve's client logs normal events at levels that read like trouble (that it is
    "connecting to existing Serve app", which it always does after serve.start), and a
    new local Ray warns that token authentication is on, which is Ray's default;
    warnings and errors otherwise still show."""
    for name in ("ray", "ray.serve"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
        _DropNotice("Token authentication is enabled for this Ray cluster"))


def failed_deployments(app: str) -> dict[str, str]:
    """Deployment name -> Serve's report (a replica constructor's traceback) for each
    deployment of `app` that failed to deploy."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return {}
    return {name: d.message for name, d in status.deployments.items()
            if str(d.status).endswith("DEPLOY_FAILED") and d.message}


def last_line(report: str) -> str:
    """The error a traceback ends with (Serve appends the actor's frames after it)."""
    lines = [line for line in report.strip().splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith(" ") and ": " in line and "Error" in line.split(": ")[0]]
    return errors[-1] if errors else (lines[-1] if lines else "")


def serve_main(ns: argparse.Namespace) -> int:
    args = app_args(ns)
    from cluster.settings import parse_settings
    try:
        settings = parse_settings(dict(args))
        settings.engine_config()          # bad engine settings fail here, before Ray starts
        settings.check_model()            # EP pools the model cannot be split over, too
    except (TypeError, ValueError) as e:
        print(f"tandem serve: {e}", file=sys.stderr)
        return 2

    import ray
    from ray import serve

    from cluster.app import build_app

    quiet_ray_logs()
    address = ns.address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    quiet_ray_logs()                       # ray.init configures Ray's loggers afresh
    serve.start(http_options={"host": ns.host, "port": ns.port})
    try:
        serve.run(build_app(args), name="tandem", route_prefix="/", blocking=False)
    except RuntimeError as e:              # a replica's constructor failed: say why, leave nothing behind
        reports = failed_deployments("tandem")
        for name, report in reports.items():
            print(f"--- {name}: what Serve reported ---\n{report}", file=sys.stderr)
        summary = "\n".join(f"  {name}: {last_line(report)}" for name, report in reports.items()) or f"  {e}"
        print(f"tandem serve: the application did not start:\n{summary}", file=sys.stderr, flush=True)
        serve.delete("tandem")
        ray.shutdown()
        return 1
    base = f"http://{ns.host}:{ns.port}"
    local = address == "local"
    print(banner(settings.model_name, settings.mode, base, ray.get_runtime_context().gcs_address, local),
          flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):    # Ctrl-C is the normal way to stop
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):                      # a timed wait lets the handlers run
        pass
    print("Stopping: the app's replicas" + (", then the local Ray instance" if local else "") + "...", flush=True)
    # Only the app is deleted: serve.shutdown() would end Serve's controller while its
    # own graceful-shutdown task runs, which Ray reports as a failed task (and on a
    # joined cluster it would end other apps too). A local instance ends with Ray.
    serve.delete("tandem")
    ray.shutdown()
    print("Stopped.", flush=True)
    return 0
