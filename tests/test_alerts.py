"""Alert rules (k8s/base/prometheusrule.yaml, the one source) pass `promtool check rules` and their unit tests
(k8s/tests/alerts.test.yml, `promtool test rules`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

K8S = Path(__file__).resolve().parent.parent / "k8s"


def write_rule_file(directory: Path) -> Path:
    """The PrometheusRule's groups as a plain Prometheus rule file."""
    groups = yaml.safe_load((K8S / "base" / "prometheusrule.yaml").read_text())["spec"]["groups"]
    path = directory / "alerts.yml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def promtool(*args: str, cwd: Path) -> str:
    binary = shutil.which("promtool")
    assert binary, "promtool is missing: scripts/test-services.sh installs it (Debian package prometheus)"
    done = subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_rules_are_valid(tmp_path: Path) -> None:
    write_rule_file(tmp_path)
    assert "SUCCESS" in promtool("check", "rules", "alerts.yml", cwd=tmp_path)


def test_rule_unit_tests_pass(tmp_path: Path) -> None:
    write_rule_file(tmp_path)
    shutil.copy(K8S / "tests" / "alerts.test.yml", tmp_path / "alerts.test.yml")
    assert "SUCCESS" in promtool("test", "rules", "alerts.test.yml", cwd=tmp_path)


def test_every_alert_has_a_unit_test_and_a_severity() -> None:
    groups = yaml.safe_load((K8S / "base" / "prometheusrule.yaml").read_text())["spec"]["groups"]
    alerts = {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}
    tests = yaml.safe_load((K8S / "tests" / "alerts.test.yml").read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    assert fired == set(alerts), f"alerts never shown firing in a unit test: {set(alerts) - fired}"
    assert all(rule["labels"]["severity"] in {"page", "ticket"} for rule in alerts.values())
