"""The container files, checked as far as a machine without a Docker engine can: hadolint on the Dockerfiles,
the compose file against the Compose specification's JSON schema, and what the stack must wire together."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from tests.conftest import REPO

DOCKER = REPO / "docker"
BIN = Path(sys.executable).parent  # hadolint and check-jsonschema come with the dev extras


def hadolint(*files: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BIN / "hadolint", "--failure-threshold", "info", *map(str, files)], capture_output=True, text=True
    )


def test_dockerfiles_pass_hadolint_and_hadolint_does_check(tmp_path):
    result = hadolint(DOCKER / "Dockerfile", DOCKER / "mlflow.Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr
    sloppy = tmp_path / "Dockerfile"
    sloppy.write_text("FROM ubuntu\nRUN apt-get install curl\n")
    result = hadolint(sloppy)
    assert result.returncode != 0 and "DL3006" in result.stdout  # untagged base image


def test_image_installs_every_dependency_but_the_base_images_torch(tmp_path):
    """The dependency layer's script, run on this pyproject.toml: everything except torch and torchvision."""
    script = re.search(r"RUN python - <<'EOF'.*?\n(.*?)\nEOF\n", (DOCKER / "Dockerfile").read_text(), re.S).group(1)
    (tmp_path / "pyproject.toml").write_bytes((REPO / "pyproject.toml").read_bytes())
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True)
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    expected = [d for d in deps if not d.startswith(("torch>", "torchvision>"))]
    assert out.stdout.splitlines() == expected and any(d.startswith("deepspeed>=") for d in expected)


def test_image_ships_the_torch_the_gpu_lane_tests_and_pyproject_allows():
    """The base image's PyTorch is the release scripts/test-gpu.sh is tested with, and inside pyproject's range."""
    from packaging.requirements import Requirement

    base = re.search(r"^ARG BASE=pytorch/pytorch:(\S+)-cuda", (DOCKER / "Dockerfile").read_text(), re.M).group(1)
    tested = re.search(r"^TESTED_TORCH=(\S+)$", (REPO / "scripts" / "test-gpu.sh").read_text(), re.M).group(1)
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = next(Requirement(d) for d in deps if Requirement(d).name == "torch")
    assert base == tested and torch_req.specifier.contains(tested), (base, tested, torch_req)
    cpu_torch = re.search(r"torch==(\S+) ", (REPO / "scripts" / "setup.sh").read_text()).group(1)
    assert torch_req.specifier.contains(cpu_torch)  # and the CPU suite's


def test_python_floor_is_what_the_tests_run_on():
    """pyproject's requires-python admits the interpreter CI runs and no older one the tests could not import on
    (they use tomllib, new in 3.11)."""
    from packaging.specifiers import SpecifierSet

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    allowed = SpecifierSet(project["requires-python"])
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in allowed
    assert "3.10" not in allowed and "3.11" in allowed


def test_compose_file_follows_the_compose_spec_and_wires_the_stack(tmp_path):
    def check(path: Path) -> subprocess.CompletedProcess:
        cmd = [BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)]
        return subprocess.run(cmd, capture_output=True, text=True)

    result = check(DOCKER / "compose.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text((DOCKER / "compose.yaml").read_text().replace("    depends_on:", "    depends_onn:", 1))
    assert check(broken).returncode != 0  # the schema does reject unknown keys

    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "minio", "create-bucket", "mlflow"}
    mlflow = services["mlflow"]
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    command = " ".join(mlflow["command"])
    assert "--backend-store-uri=postgresql+psycopg2://" in command and "@postgres:5432/" in command
    assert "--artifacts-destination=s3://mlflow/" in command and mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"]
    server_image = (DOCKER / mlflow["build"]["dockerfile"]).read_text()
    assert "psycopg2" in server_image and "boto3" in server_image
