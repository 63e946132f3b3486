"""wss:// between real processes, with a certificate authority made by the test (trustme)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import trustme

from butterfly import Butterfly, LocalCluster, NetworkError
from butterfly.model.zoo import mlp

pytestmark = pytest.mark.slow

SECRET = "a secret shared by the TLS cluster"
UNIFORM = {"default_strategy": "uniform"}  # both workers hold a stage: they link over wss://


class Pki:
    """A CA and PEM files of a certificate for 127.0.0.1 that it signed."""

    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        self.ca_file = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.cert_file, self.key_file = self.issue(directory, "127.0.0.1")

    def issue(self, directory: Path, name: str) -> tuple[Path, Path]:
        leaf = self.ca.issue_cert(name)
        cert, key = directory / f"{name}.pem", directory / f"{name}.key"
        leaf.private_key_and_cert_chain_pem.write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        return cert, key

    def worker_args(self, *extra: str) -> list[str]:
        return [
            "--tls-cert", str(self.cert_file), "--tls-key", str(self.key_file),
            "--tls-ca", str(self.ca_file), *extra,
        ]  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_cluster(pki: Pki) -> Iterator[LocalCluster]:
    with LocalCluster(
        "butterfly.model.zoo:mlp", workers=2, secret=SECRET, extra_args=pki.worker_args()
    ) as cluster:
        yield cluster


def _local(x: torch.Tensor) -> torch.Tensor:
    torch.set_num_threads(1)
    with torch.inference_mode():
        return mlp()(x)


def test_workers_with_a_certificate_serve_wss_and_a_client_trusting_the_ca_is_served(
    pki: Pki, tls_cluster: LocalCluster
) -> None:
    assert all(a.startswith("wss://127.0.0.1:") for a in tls_cluster.addresses)
    config = {"network": {"tls_ca": str(pki.ca_file)}, "partition": UNIFORM}
    x = torch.randn(3, 64)
    with Butterfly.connect(tls_cluster.addresses, secret=SECRET, config=config) as b:
        assert len(b.cluster().stages) == 2
        assert torch.equal(b.infer(x), _local(x))


def test_a_client_that_trusts_another_ca_is_refused(
    tls_cluster: LocalCluster, tmp_path: Path
) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    with pytest.raises(NetworkError, match="certificate verify failed"):
        Butterfly.connect(
            tls_cluster.addresses, secret=SECRET, config={"network": {"tls_ca": str(other)}}
        )


def test_with_client_auth_a_client_needs_a_certificate_the_ca_signed(
    pki: Pki, tmp_path: Path
) -> None:
    client_cert, client_key = pki.issue(tmp_path, "client")
    with LocalCluster(
        "butterfly.model.zoo:mlp",
        workers=1,
        secret=SECRET,
        extra_args=pki.worker_args("--tls-client-auth"),
    ) as cluster:
        anonymous = {"network": {"tls_ca": str(pki.ca_file), "connect_timeout": 2.0}}
        with pytest.raises(NetworkError, match="no worker reachable"):
            Butterfly.connect(cluster.addresses, secret=SECRET, config=anonymous, timeout=10)
        mutual = {
            "network": {
                "tls_ca": str(pki.ca_file),
                "tls_cert": str(client_cert),
                "tls_key": str(client_key),
                "tls_client_auth": True,
            }
        }
        x = torch.randn(1, 64)
        with Butterfly.connect(cluster.addresses, secret=SECRET, config=mutual) as b:
            assert torch.equal(b.infer(x), _local(x))


def test_a_worker_with_a_missing_key_file_exits_with_a_one_line_reason(
    pki: Pki, tmp_path: Path
) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable, "-m", "butterfly.worker", "--listen", "127.0.0.1:0",
            "--model", "butterfly.model.zoo:mlp", "--tls-cert", str(pki.cert_file),
            "--tls-key", str(tmp_path / "missing.key"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "network.tls_cert:" in result.stderr
    assert result.stderr.count("\n") == 1
