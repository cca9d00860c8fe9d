"""The NATS broker tier: render deploy/nats's templates into node configs, and run a cluster of them.

What is shipped is what is tested: :func:`render_node` and :func:`render_authorization` only fill the
``{{FIELD}}`` slots of ``deploy/nats/`` (ports, paths, routes, one user per device certificate), and
:class:`NatsCluster` runs exactly those files, one nats-server process per node on loopback::

    cluster = NatsCluster(tmp / "nats", pki_dir, size=3).start()   # waits for /healthz on every node
    cluster.mqtt_url(0)          # mqtts://127.0.0.1:PORT, a device's broker
    cluster.nats_urls            # tls://127.0.0.1:PORT, ... the ingest workers' servers
    cluster.kill(1); cluster.restart(1)                             # SIGKILL, then the same node again
    cluster.stop()

For a deployment, ``python -m trainer.ops.nats_cluster render --pki DIR --out DIR --node NAME=HOST ...``
writes one config per node and the authorization file beside them (docs/scale-out.md).
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from trainer.ops.broker import die_with_parent, free_port

DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy" / "nats"
_SLOT = re.compile(r"\{\{([A-Z_]+)\}\}")


def find_nats_server() -> str | None:
    """Path of nats-server (Debian installs it in /usr/sbin, often not on PATH)."""
    import shutil

    return shutil.which("nats-server") or next(
        (p for p in ("/usr/sbin/nats-server", "/usr/local/bin/nats-server") if Path(p).is_file()), None
    )


def fill(template: str, values: dict[str, str], where: str) -> str:
    """``template`` with each ``{{FIELD}}`` replaced; ValueError naming a field left without a value."""
    missing = sorted({m for m in _SLOT.findall(template) if m not in values})
    if missing:
        raise ValueError(f"{where}: no value for {', '.join(missing)}")
    return _SLOT.sub(lambda m: values[m.group(1)], template)


def _template(name: str, template_dir: Path | None) -> tuple[str, str]:
    path = (template_dir or DEPLOY_DIR) / name
    try:
        return path.read_text(), str(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: the NATS broker templates (deploy/nats) are missing") from None


def nats_device_id(device: str) -> str:
    """``device`` if it can be a NATS user's topic token; ValueError otherwise.

    nats-server 2.9 refuses MQTT topics containing ``.`` or a space (they cannot become subjects), so a
    device named ``cam.01`` could never publish; say so when its user is rendered, not in the field.
    """
    from trainer.ops.pki import check_device_name

    check_device_name(device)
    if "." in device:
        raise ValueError(
            f"device id {device!r} contains '.': nats-server 2.9 cannot carry MQTT topics with '.', "
            "so it could never publish on the NATS broker tier; issue it a name without '.'"
        )
    return device


def render_authorization(devices: Sequence[str], template_dir: Path | None = None) -> str:
    """deploy/nats/authorization.conf with one device-user.conf entry per device."""
    text, where = _template("authorization.conf", template_dir)
    entry, entry_where = _template("device-user.conf", template_dir)
    users = "".join(fill(entry, {"DEVICE": nats_device_id(d)}, entry_where) for d in sorted(set(devices)))
    return fill(text, {"DEVICE_USERS": users.rstrip("\n")}, where)


@dataclass(frozen=True)
class NodeAddress:
    """Where one node listens: its name, and the host and ports of each listener."""

    name: str
    host: str = "127.0.0.1"
    client_port: int = 4222
    mqtt_port: int = 8883
    cluster_port: int = 6222
    http_port: int = 8222
    http_host: str = "127.0.0.1"


@dataclass(frozen=True)
class NodeFiles:
    """The broker's TLS files (edgefleet pki: ca.crt, server/broker.crt and .key), the route certificate
    (:func:`issue_route_certificate`) and the node's store."""

    ca: Path
    cert: Path
    key: Path
    route_cert: Path
    route_key: Path
    store_dir: Path
    max_file_store: str = "10GB"


def issue_route_certificate(
    pki_dir: Path, out_dir: Path, hosts: Sequence[str], days: int = 825
) -> tuple[Path, Path]:
    """A certificate for the nodes' routes, signed by the fleet CA in ``pki_dir``: serverAuth AND
    clientAuth, since nats-server verifies both ends of a route (``edgefleet pki``'s server certificates
    are serverAuth only and are refused as a route's client). ``hosts`` are its subject alt names."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    pki = Path(pki_dir)
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nats-route")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    crt, pem = out / "route.crt", out / "route.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.touch(mode=0o600)
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return crt, pem


def render_node(
    node: NodeAddress, peers: Sequence[NodeAddress], files: NodeFiles, template_dir: Path | None = None
) -> str:
    """deploy/nats/node.conf for ``node``, routing to every other node of ``peers``."""
    text, where = _template("node.conf", template_dir)
    routes = [f'    "nats-route://{p.host}:{p.cluster_port}"' for p in peers if p.name != node.name]
    values = {
        "NODE": node.name,
        "CLIENT_HOST": node.host,
        "CLIENT_PORT": str(node.client_port),
        "MQTT_HOST": node.host,
        "MQTT_PORT": str(node.mqtt_port),
        "CLUSTER_HOST": node.host,
        "CLUSTER_PORT": str(node.cluster_port),
        "HTTP_HOST": node.http_host,
        "HTTP_PORT": str(node.http_port),
        "CA_FILE": str(files.ca),
        "CERT_FILE": str(files.cert),
        "KEY_FILE": str(files.key),
        "ROUTE_CERT_FILE": str(files.route_cert),
        "ROUTE_KEY_FILE": str(files.route_key),
        "STORE_DIR": str(files.store_dir),
        "MAX_FILE_STORE": files.max_file_store,
        "ROUTES": "\n".join(routes),
    }
    return fill(text, values, where)


def device_ids(pki_dir: Path) -> list[str]:
    """The common names of the device certificates ``edgefleet pki issue-device`` wrote in ``pki_dir``."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    ids = []
    for crt in sorted((Path(pki_dir) / "device").glob("*.crt")):
        cert = x509.load_pem_x509_certificate(crt.read_bytes())
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not names:
            raise ValueError(f"{crt}: the certificate has no common name")
        ids.append(str(names[0].value))
    return ids


@dataclass
class _Node:
    address: NodeAddress
    conf: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class NatsCluster:
    """A cluster of nats-server processes on loopback, configured from deploy/nats as shipped."""

    workdir: Path
    pki_dir: Path
    size: int = 3
    devices: Sequence[str] | None = None
    """Device users to render (default: every device certificate in ``pki_dir``)."""
    binary: str | None = None
    template_dir: Path | None = None
    nodes: list[_Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.binary = self.binary or find_nats_server()
        if not self.binary:
            raise FileNotFoundError("nats-server binary not found (apt-get install nats-server)")
        addresses = [
            NodeAddress(
                f"n{i}",
                client_port=free_port(),
                mqtt_port=free_port(),
                cluster_port=free_port(),
                http_port=free_port(),
            )
            for i in range(self.size)
        ]
        self.workdir.mkdir(parents=True, exist_ok=True)
        devices = list(self.devices) if self.devices is not None else device_ids(self.pki_dir)
        (self.workdir / "authorization.conf").write_text(render_authorization(devices, self.template_dir))
        pki = Path(self.pki_dir)
        route_cert, route_key = issue_route_certificate(pki, self.workdir, ("127.0.0.1", "localhost"))
        for a in addresses:
            files = NodeFiles(
                pki / "ca.crt",
                pki / "server" / "broker.crt",
                pki / "server" / "broker.key",
                route_cert,
                route_key,
                self.workdir / a.name / "jetstream",
                max_file_store="1GB",
            )
            conf = self.workdir / f"{a.name}.conf"
            conf.write_text(render_node(a, addresses, files, self.template_dir))
            self.nodes.append(_Node(a, conf, self.workdir / f"{a.name}.log"))

    # -- addresses ----------------------------------------------------------------------------------
    def mqtt_url(self, i: int) -> str:
        """The MQTT listener of node ``i`` (mutual TLS)."""
        return f"mqtts://127.0.0.1:{self.nodes[i].address.mqtt_port}"

    @property
    def nats_urls(self) -> list[str]:
        """Every node's NATS client listener (mutual TLS)."""
        return [f"tls://127.0.0.1:{n.address.client_port}" for n in self.nodes]

    # -- processes ----------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> NatsCluster:
        """Start every node; return once each answers /healthz (JetStream current) or raise."""
        for i in range(self.size):
            self._spawn(i)
        self.wait_healthy(timeout=timeout)
        return self

    def _spawn(self, i: int) -> None:
        node = self.nodes[i]
        node.proc = subprocess.Popen(
            [str(self.binary), "-c", str(node.conf), "-l", str(node.log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )

    def healthy(self, i: int) -> bool:
        """Whether node ``i`` answers /healthz with ok (its JetStream is up and current)."""
        url = f"http://127.0.0.1:{self.nodes[i].address.http_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def wait_healthy(self, nodes: Sequence[int] | None = None, timeout: float = 30.0) -> None:
        """Wait until the given nodes (default: all) are healthy; RuntimeError with the log if one died."""
        deadline = time.monotonic() + timeout
        todo = list(range(self.size) if nodes is None else nodes)
        while todo:
            for i in list(todo):
                proc = self.nodes[i].proc
                if proc is None or proc.poll() is not None:
                    raise RuntimeError(f"nats-server {self.nodes[i].address.name} exited: {self.log_tail(i)}")
                if self.healthy(i):
                    todo.remove(i)
            if todo and time.monotonic() > deadline:
                names = ", ".join(self.nodes[i].address.name for i in todo)
                raise TimeoutError(f"nats-server {names} not healthy within {timeout:g} s")
            if todo:
                time.sleep(0.2)

    def log_tail(self, i: int, chars: int = 3000) -> str:
        """The end of node ``i``'s log (and its stderr when it exited)."""
        node = self.nodes[i]
        text = node.log.read_text() if node.log.exists() else ""
        if node.proc is not None and node.proc.poll() is not None and node.proc.stderr:
            text += node.proc.stderr.read().decode(errors="replace")
        return text[-chars:]

    def kill(self, i: int) -> None:
        """SIGKILL node ``i`` (a crash: nothing flushed, no goodbye to the routes)."""
        self._end(i, signal.SIGKILL)

    def stop_node(self, i: int) -> None:
        """Stop node ``i`` cleanly (SIGTERM)."""
        self._end(i, signal.SIGTERM)

    def _end(self, i: int, sig: int) -> None:
        proc = self.nodes[i].proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()
        self.nodes[i].proc = None

    def restart(self, i: int, timeout: float = 60.0) -> None:
        """Start node ``i`` again on its store and ports; wait until it is healthy."""
        self._end(i, signal.SIGTERM)
        self._spawn(i)
        self.wait_healthy([i], timeout=timeout)

    def running(self, i: int) -> bool:
        proc = self.nodes[i].proc
        return proc is not None and proc.poll() is None

    def stop(self) -> None:
        """Stop every node."""
        for i in range(self.size):
            self._end(i, signal.SIGTERM)

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _parse_node(spec: str) -> NodeAddress:
    name, _, host = spec.partition("=")
    if not name or not host:
        raise argparse.ArgumentTypeError(f"--node must be NAME=HOST (got {spec!r})")
    return NodeAddress(name, host=host)


def render_main(argv: Sequence[str] | None = None) -> int:
    """``python -m trainer.ops.nats_cluster render``: write each node's config and authorization.conf."""
    p = argparse.ArgumentParser(prog="python -m trainer.ops.nats_cluster render")
    p.add_argument(
        "--pki", type=Path, required=True, help="the edgefleet pki directory (device certificates)"
    )
    p.add_argument("--out", type=Path, required=True, help="where to write NODE.conf and authorization.conf")
    p.add_argument("--node", type=_parse_node, action="append", required=True, help="NAME=HOST, one per node")
    p.add_argument(
        "--certs",
        type=Path,
        default=Path("/etc/nats/certs"),
        help="where the nodes find ca.crt, broker.crt/.key and route.crt/.key (written to --out)",
    )
    p.add_argument("--store", type=Path, default=Path("/var/lib/nats/jetstream"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "authorization.conf").write_text(render_authorization(device_ids(args.pki)))
    issue_route_certificate(args.pki, args.out, [n.host for n in args.node])
    c = args.certs
    files = NodeFiles(
        c / "ca.crt", c / "broker.crt", c / "broker.key", c / "route.crt", c / "route.key", args.store
    )
    for node in args.node:
        (args.out / f"{node.name}.conf").write_text(render_node(node, args.node, files))
        print(args.out / f"{node.name}.conf")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["render"]:
        sys.exit("usage: python -m trainer.ops.nats_cluster render --pki DIR --out DIR --node NAME=HOST ...")
    sys.exit(render_main(sys.argv[2:]))
