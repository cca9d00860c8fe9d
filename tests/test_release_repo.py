"""The release repository (trainer side) and its HTTP server, checked by the device's own TUF client.

Real keys, real signatures, a real HTTP server; every repository change is verified from a device's
point of view: a client that pinned the very first root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest

from edge_agent.updater.errors import UpdateRejected
from edge_agent.updater.release_info import parse_release_info
from edge_agent.updater.tufclient import ReleaseRepositoryClient
from trainer.errors import KeyStoreError, ReleaseError
from trainer.ops.broker import free_port
from trainer.release.repository import Expiry, ReleaseRepository
from trainer.release.server import ReleaseServer
from trainer.sim.tiny import build_tiny_package
from trainer.store import Store

from .mqtt_helpers import wait_until


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pkgs")
    return {v: build_tiny_package(d / v, version=v).root for v in ("1.0.0", "2.0.0", "3.0.0")}


def _client(server: ReleaseServer, root: Path, cache: Path) -> ReleaseRepositoryClient:
    return ReleaseRepositoryClient(server.url, root, cache)


def test_init_keys_are_private_and_thresholds_hold(tmp_path: Path) -> None:
    repo = ReleaseRepository.init(
        tmp_path / "repo", root_keys=3, root_threshold=2, offline_keys=tmp_path / "offline"
    )
    assert (tmp_path / "repo" / "keys").stat().st_mode & 0o777 == 0o700
    pems = list((tmp_path / "offline").glob("*.pem")) + list((tmp_path / "repo" / "keys").glob("*.pem"))
    assert len(pems) == 3 + 1 + 2 + 2  # root x3, targets; snapshot, timestamp; canary, stable
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in pems)
    assert {p.name.split("-")[0] for p in (tmp_path / "offline").glob("*.pem")} == {"root", "targets"}
    root = json.loads(repo.root_bytes())
    assert root["signed"]["roles"]["root"]["threshold"] == 2 and len(root["signatures"]) == 3
    assert root["signed"]["consistent_snapshot"] is True
    targets = json.loads(repo.metadata_path("targets").read_bytes())["signed"]
    assert {r["name"]: r["paths"] for r in targets["delegations"]["roles"]} == {
        "canary": ["canary/*/*"],
        "stable": ["stable/*/*"],
    }
    with pytest.raises(ReleaseError, match="already exists"):
        ReleaseRepository.init(tmp_path / "repo")


def test_counters_promote_and_rollback_as_roll_forward(tmp_path: Path, packages: dict[str, Path]) -> None:
    repo = ReleaseRepository.init(tmp_path / "repo")
    r1 = repo.publish(packages["1.0.0"], channel="canary", fleet="shop")
    r2 = repo.publish(packages["2.0.0"], channel="canary", fleet="shop")
    p3 = repo.promote("shop", "colour")  # canary (2.0.0) -> stable
    rb = repo.rollback("shop", "colour", "canary")  # canary back to 1.0.0's bytes
    assert [r.release for r in (r1, r2, p3, rb)] == [1, 2, 3, 4]
    assert (
        p3.channel == "stable"
        and p3.sha256 == r2.sha256
        and p3.source_release == 2
        and p3.action == "promote"
    )
    assert rb.sha256 == r1.sha256 and rb.package_sha256 == r1.package_sha256 and rb.action == "rollback"
    assert repo.current("canary", "shop", "colour").release == 4
    assert repo.rollback("shop", "colour", "canary", to_release=2).sha256 == r2.sha256
    assert [r.release for r in repo.releases()] == [1, 2, 3, 4, 5]
    with pytest.raises(ReleaseError, match="unknown channel"):
        repo.publish(packages["3.0.0"], channel="beta", fleet="shop")
    with pytest.raises(ReleaseError, match="fleet 'shop/x'"):
        repo.publish(packages["3.0.0"], channel="canary", fleet="shop/x")
    # the counter is derived from signed metadata too, so a lost ledger cannot make it go backwards
    repo.ledger_path.unlink()
    assert repo.publish(packages["3.0.0"], channel="canary", fleet="shop").release == 6
    with ReleaseServer(repo.path) as server:
        (tmp_path / "root.json").write_bytes((repo.metadata_dir / "1.root.json").read_bytes())
        c = _client(server, tmp_path / "root.json", tmp_path / "dev")
        info = parse_release_info(c.targetinfo("stable/shop/colour.tar").custom)
        assert (info.release, info.version, info.action) == (3, "2.0.0", "promote")
        c.close()


def test_every_key_rotation_is_accepted_by_a_device_that_pinned_root_v1(
    tmp_path: Path, packages: dict[str, Path]
) -> None:
    repo = ReleaseRepository.init(tmp_path / "repo")
    (tmp_path / "root.json").write_bytes(repo.root_bytes())
    repo.publish(packages["1.0.0"], channel="canary", fleet="shop")
    with ReleaseServer(repo.path) as server:
        c = _client(server, tmp_path / "root.json", tmp_path / "dev")
        assert c.targetinfo("canary/shop/colour.tar") is not None  # caches v1 metadata
        for role in ("root", "timestamp", "snapshot", "targets", "canary"):
            old = set(json.loads(repo.root_bytes())["signed"]["keys"]) | set(repo.keys.uris())
            new = repo.rotate_key(role)
            assert not set(new) & old
            rec = repo.publish(
                packages["2.0.0" if role != "canary" else "3.0.0"], channel="canary", fleet="shop"
            )
            info = c.targetinfo("canary/shop/colour.tar")
            assert info is not None and parse_release_info(info.custom).release == rec.release, role
        assert c.trusted_root_version() == json.loads(repo.root_bytes())["signed"]["version"] == 5
        retired = list((tmp_path / "repo" / "keys" / "retired").glob("*.pem"))
        assert len(retired) >= 4 and all(p.stat().st_mode & 0o777 == 0o600 for p in retired)
        c.close()


def test_signing_needs_private_keys_and_refuses_readable_ones(
    tmp_path: Path, packages: dict[str, Path]
) -> None:
    repo = ReleaseRepository.init(
        tmp_path / "repo", root_keys=3, root_threshold=2, offline_keys=tmp_path / "usb"
    )
    canary_key = next((tmp_path / "repo" / "keys").glob("canary-*.pem"))
    os.chmod(canary_key, 0o644)
    with pytest.raises(KeyStoreError, match="too open"):
        repo.publish(packages["1.0.0"], channel="canary", fleet="shop")
    os.chmod(canary_key, 0o600)
    repo.publish(packages["1.0.0"], channel="canary", fleet="shop")
    # The root keys are offline: with only one of the three present, a root change cannot reach 2 signatures.
    (tmp_path / "usb-away").mkdir()
    for p in sorted((tmp_path / "usb").glob("root-*.pem"))[:2]:
        os.replace(p, tmp_path / "usb-away" / p.name)
    keys_before = repo.keys.uris()
    with pytest.raises(ReleaseError, match="cannot sign root"):
        repo.rotate_key("timestamp")
    assert json.loads(repo.root_bytes())["signed"]["version"] == 1  # nothing half-written
    assert repo.keys.uris() == keys_before  # and no orphan key left behind
    repo.publish(packages["2.0.0"], channel="canary", fleet="shop")  # releases need no offline key


def test_server_ranges_traversal_and_resumed_download(tmp_path: Path) -> None:
    big = build_tiny_package(tmp_path / "big", version="9.0.0", padding_bytes=300_000)
    repo = ReleaseRepository.init(tmp_path / "repo")
    rec = repo.publish(big.root, channel="canary", fleet="shop")
    (tmp_path / "root.json").write_bytes(repo.root_bytes())
    blob = repo.blob_path(rec.target, rec.sha256).read_bytes()
    with ReleaseServer(repo.path) as server:
        url = f"{server.url}/targets/canary/shop/{rec.sha256}.colour.tar"
        req = urllib.request.Request(url, headers={"Range": "bytes=100-199"})
        with urllib.request.urlopen(req) as r:
            assert r.status == 206 and r.read() == blob[100:200]
            assert r.headers["Content-Range"] == f"bytes 100-199/{len(blob)}"
        for bad in (
            "/../repository.json",
            "/metadata/../signers.json",
            "/keys/",
            "/signers.json",
            "/targets/%2e%2e/x",
        ):
            with pytest.raises(urllib.error.HTTPError) as exc:
                urllib.request.urlopen(server.url + bad)
            assert exc.value.code in (400, 404), bad
        c = _client(server, tmp_path / "root.json", tmp_path / "dev")
        info = c.targetinfo(rec.target)
        part = tmp_path / "dl.part"
        part.write_bytes(blob[: len(blob) // 2])  # an interrupted earlier download
        before = server.stats()["by_status"].get("206", 0)
        assert c.download(info, part) == len(blob) // 2
        assert part.read_bytes() == blob and server.stats()["by_status"]["206"] == before + 1
        part.write_bytes(b"\0" * (len(blob) // 2))  # a stale prefix: verified, found wrong, fetched whole
        c.download(info, part)
        assert part.read_bytes() == blob
        repo.blob_path(rec.target, rec.sha256).write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
        part.unlink()
        with pytest.raises(UpdateRejected) as rej:
            c.download(info, part)
        assert rej.value.reason == "artifact_mismatch" and not part.exists()
        c.close()


def test_server_serves_only_regular_files_answers_416_and_bounds_connections(tmp_path: Path) -> None:
    """A symlink under targets/ into keys/ was served with 200; an inverted range gave 206 with a
    negative Content-Length; 900 slow connections made 904 threads."""
    import socket

    repo = ReleaseRepository.init(tmp_path / "repo")
    rec = repo.publish(
        build_tiny_package(tmp_path / "p", version="1.0.0").root, channel="canary", fleet="shop"
    )
    key = next((repo.path / "keys").rglob("*"))
    (repo.path / "targets" / "leak").symlink_to(key)
    (repo.path / "targets" / "keysdir").symlink_to(repo.path / "keys", target_is_directory=True)
    with ReleaseServer(repo.path) as server:
        for bad in ("/targets/leak", f"/targets/keysdir/{key.name}"):
            with pytest.raises(urllib.error.HTTPError) as exc:
                urllib.request.urlopen(server.url + bad)
            assert exc.value.code == 404, bad
        url = f"{server.url}/targets/canary/shop/{rec.sha256}.colour.tar"
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=10-5"}))
        assert exc.value.code == 416
        server._httpd.max_connections = 8
        server._httpd.idle_timeout_s = 1.5
        slow = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(20)]
        for s in slow:
            s.sendall(b"GET /targets/")  # a request that never finishes
        time.sleep(0.3)
        assert server._httpd.open_connections() == 8
        assert server.stats()["by_status"].get("503", 0) == 12
        drip = slow[0]
        for _ in range(4):  # one byte a second is no progress: the whole request must come in time
            time.sleep(0.8)
            try:
                drip.sendall(b"x")
            except OSError:
                break
        assert wait_until(lambda: server._httpd.open_connections() == 0, 10)
        with urllib.request.urlopen(url) as r:  # and it serves again
            assert r.status == 200
        for s in slow:
            s.close()


def test_server_keeps_the_timestamp_fresh(tmp_path: Path) -> None:
    ReleaseRepository.init(tmp_path / "repo")
    repo = ReleaseRepository(tmp_path / "repo", expiry=Expiry(timestamp=timedelta(seconds=4)))
    repo.refresh(force=True)
    v0 = json.loads(repo.metadata_path("timestamp").read_bytes())["signed"]["version"]
    with ReleaseServer(repo.path, repository=repo, resign_interval_s=0.3):
        time.sleep(3.0)  # half of the 4 s lifetime passes: re-signed at least once
    ts = json.loads(repo.metadata_path("timestamp").read_bytes())["signed"]
    assert ts["version"] > v0


def test_release_cli(tmp_path: Path, packages: dict[str, Path]) -> None:
    def run(*args: str) -> str:
        p = subprocess.run(
            [sys.executable, "-m", "edge_agent.cli", "release", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode == 0, p.stderr
        return p.stdout

    repo = str(tmp_path / "repo")
    run("init", "--repo", repo, "--root-keys", "2", "--root-threshold", "2")
    assert "release 1: colour 1.0.0 -> canary" in run(
        "publish", str(packages["1.0.0"]), "--repo", repo, "--channel", "canary", "--fleet", "shop"
    )
    run("publish", str(packages["2.0.0"]), "--repo", repo, "--channel", "canary", "--fleet", "shop")
    assert "release 3: colour 2.0.0 -> stable" in run(
        "promote", "--repo", repo, "--fleet", "shop", "--model", "colour"
    )
    assert "release 4: colour 1.0.0 -> canary" in run(
        "rollback", "--repo", repo, "--fleet", "shop", "--model", "colour", "--channel", "canary"
    )
    assert "new key" in run("rotate-key", "root", "--repo", repo)
    status = json.loads(run("status", "--repo", repo, "--json"))
    assert status["roles"]["root"]["version"] == 2 and status["roles"]["root"]["threshold"] == 2
    assert [r["release"] for r in status["ledger"]] == [1, 2, 3, 4]
    assert "rollback of release 1" in run("status", "--repo", repo)
    run("export-root", "--repo", repo, "--out", str(tmp_path / "root.json"))
    assert json.loads((tmp_path / "root.json").read_text())["signed"]["version"] == 2
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_agent.cli",
            "release",
            "publish",
            str(packages["1.0.0"]),
            "--repo",
            repo,
            "--channel",
            "nightly",
            "--fleet",
            "shop",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "unknown channel 'nightly'" in bad.stderr


def test_a_canary_published_by_hand_can_be_promoted_by_hand(
    tmp_path: Path, packages: dict[str, Path]
) -> None:
    """``release publish --db`` records the canary as a rollout, so ``rollout promote`` finds it (it used
    to say "no canary is running" for a canary the service had not published itself)."""

    def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(
            [sys.executable, "-m", "edge_agent.cli", *args], capture_output=True, text=True, timeout=60
        )
        assert (p.returncode == 0) == ok, (p.stdout, p.stderr)
        return p

    repo, db = str(tmp_path / "repo"), f"sqlite:///{tmp_path / 'fleet.db'}"
    run("release", "init", "--repo", repo)
    common = ("--repo", repo, "--fleet", "shop", "--db", db)
    assert (
        "rollout 1 (all)"
        in run("release", "publish", str(packages["1.0.0"]), "--channel", "stable", *common).stdout
    )
    out = run(
        "release", "publish", str(packages["2.0.0"]), "--channel", "canary", "--canary-share", "0.2", *common
    )
    assert "rollout 2 (canary:2000bp)" in out.stdout
    rollout = ("rollout", "promote", "--repo", repo, "--fleet", "shop", "--db", db, "--reason", "looks good")
    assert "promote: release 3 on stable" in run(*rollout).stdout
    assert "no canary is running" in run(*rollout, ok=False).stdout  # decided once, not twice
    with Store(db) as store:
        assert [r.state for r in store.rollouts("shop")] == ["done", "promoted", "done"]
        assert [e.action for e in store.audit_log(subject="rollout/2")] == [
            "rollout.start",
            "rollout.promoted",
        ]


def test_rollout_promote_and_abort_send_their_hint_over_mutual_tls(
    tmp_path: Path, packages: dict[str, Path], mosquitto_binary: str, pki: Path
) -> None:
    """``rollout promote|abort --broker mqtts://... --ca --cert --key`` announce their release through the
    shipped broker configuration (client certificates, the ACL, the guard's client-id binding): the
    retained hint is there for a device that subscribes after the command has exited."""
    from .update_helpers import DeployedBroker, TlsClient

    def run(*args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(
            [sys.executable, "-m", "edge_agent.cli", *args], capture_output=True, text=True, timeout=60
        )
        assert p.returncode == code, (p.stdout, p.stderr)
        return p

    def retained(channel: str) -> dict:
        """The retained hint a device reads on subscribing to ``release/{channel}`` now."""
        device = TlsClient(broker.port, pki, "dev-b", "device")
        try:
            assert device.subscribe(f"ef/v1/shop/release/{channel}") == 1
            assert wait_until(lambda: device.json_messages(f"/release/{channel}"), 10), f"no {channel} hint"
            assert all(retain for _, _, retain in device.messages)
            return device.json_messages(f"/release/{channel}")[-1]
        finally:
            device.close()

    repo, db = str(tmp_path / "repo"), f"sqlite:///{tmp_path / 'fleet.db'}"
    common = ("--repo", repo, "--fleet", "shop", "--db", db)
    run("release", "init", "--repo", repo)
    run("release", "publish", str(packages["1.0.0"]), "--channel", "stable", *common)
    broker = DeployedBroker(tmp_path / "broker", pki, mosquitto_binary).start()
    tls = (
        *("--broker", f"mqtts://127.0.0.1:{broker.service_port}", "--ca", str(pki / "ca.crt")),
        *("--cert", str(pki / "service" / "trainer.crt"), "--key", str(pki / "service" / "trainer.key")),
    )
    try:
        canary = ("release", "publish", "--channel", "canary", "--canary-share", "0.2", *common)
        run(*canary[:2], str(packages["2.0.0"]), *canary[2:])
        # A broker it cannot reach, or one refusing its certificate for this client id: one line, exit 2,
        # and nothing decided (the hint used to be dropped silently after a successful-looking promote).
        unreachable = (*tls[:1], f"mqtts://127.0.0.1:{free_port()}", *tls[2:])
        device_cert = (
            *tls[:5],
            str(pki / "device" / "dev-a.crt"),
            "--key",
            str(pki / "device" / "dev-a.key"),
        )
        for flags, why in ((unreachable, "Connection refused"), (device_cert, "refused: Not authorized")):
            err = run("rollout", "promote", *common, "--reason", "r", *flags, code=2).stderr.strip()
            assert err.startswith("edgefleet: error: cannot connect to") and why in err, err
            assert len(err.splitlines()) == 1, err
        status = run("rollout", "status", "--repo", repo, "--fleet", "shop", "--db", db).stdout
        assert [json.loads(line)["state"] for line in status.splitlines()] == ["done", "active"]
        out = run("rollout", "promote", *common, "--reason", "looks good", *tls).stdout
        assert "promote: release 3 on stable" in out
        hint = retained("stable")
        assert (hint["release"], hint["version"], hint["action"]) == (3, "2.0.0", "promote"), hint
        run(*canary[:2], str(packages["3.0.0"]), *canary[2:])  # release 4, a canary that goes wrong
        out = run("rollout", "abort", *common, "--reason", "worse on the canaries", *tls).stdout
        assert "rollback: release 5 on canary" in out
        hint = retained("canary")
        assert (hint["release"], hint["version"], hint["action"]) == (5, "2.0.0", "rollback"), hint
    finally:
        broker.stop()
