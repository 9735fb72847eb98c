"""
The manhole: an SSH admin shell (a Python prompt) into the running router.

Public-key login only, any user name whose key is in ``authorized_keys``
(read at each login, so adding a key needs no restart; there is no password
login to guess at). The host key is generated into the state directory on
first start and kept, so clients can pin it. The namespace holds C{router},
C{table} (always the current routing table), C{connections()} and C{reactor}.
"""

from __future__ import annotations

import os
from typing import Any, Callable, cast

from twisted.conch import manhole, manhole_ssh
from twisted.conch.checkers import IAuthorizedKeysDB, SSHPublicKeyChecker, readAuthorizedKeyFile
from twisted.conch.insults import insults
from twisted.conch.ssh import keys
from twisted.cred.portal import IRealm, Portal
from twisted.logger import Logger
from zope.interface import implementer

log = Logger(namespace="portrouter.manhole")

HOST_KEY = "manhole_host_key"


@implementer(IAuthorizedKeysDB)
class AuthorizedKeysFile:
    """Every key of one file, whatever the user name."""

    def __init__(self, path: str):
        self.path = path

    def getAuthorizedKeys(self, username: bytes) -> list[keys.Key]:
        try:
            with open(self.path, "rb") as f:
                return list(readAuthorizedKeyFile(f))
        except OSError as e:
            log.warn("manhole: cannot read {path}: {why}", path=self.path, why=e.strerror)
            return []


def host_key(directory: str) -> keys.Key:
    """The manhole's host key, made on first use and kept (mode 0600)."""
    path = os.path.join(directory, HOST_KEY)
    if os.path.exists(path):
        kept: keys.Key = keys.Key.fromFile(path)
        return kept
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = keys.Key(ed25519.Ed25519PrivateKey.generate())
    os.makedirs(directory, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.toString("openssh"))
    log.info("manhole: generated host key {path} ({fingerprint})", path=path,
             fingerprint=key.fingerprint(keys.FingerprintFormats.SHA256_BASE64))
    return key


class LiveTable:
    """C{table} in the manhole: whatever the router's table is now."""

    def __init__(self, router: Any):
        self._router = router

    def __getattr__(self, name: str) -> Any:
        return getattr(self._router.table, name)

    def __repr__(self) -> str:
        routes = self._router.table.routes
        return f"<RoutingTable: {len(routes)} routes, {len(self._router.table.projects)} projects>"


def connections(router: Any) -> list[dict[str, Any]]:
    """The live relayed connections, for a human at the prompt."""
    now = router.reactor.seconds()
    return [
        {
            "protocol": s.protocol, "project": s.project, "peer": s.peer,
            "bytes_in": s.bytes_in, "bytes_out": s.bytes_out, "age": round(now - s.started, 3),
        }
        for s in sorted(router.sessions.live, key=lambda s: s.started)
    ]


class Text(str):
    """Shown as it reads at the prompt, not as a quoted string."""

    def __repr__(self) -> str:
        return str(self).rstrip("\n")


def make_manhole(router: Any, authorized_keys: str, state_dir: str,
                 routes: Callable[[], str] = lambda: "") -> manhole_ssh.ConchFactory:
    """
    The SSH shell; C{routes} gives the routing table as C{GET
    /_api/routes?format=text} shows it (with hostnames), for C{routes()}.
    """
    namespace = {
        "router": router,
        "table": LiveTable(router),
        "routes": lambda: Text(routes()),
        "connections": lambda: connections(router),
        "reactor": router.reactor,
    }
    realm = manhole_ssh.TerminalRealm()
    # Twisted annotates this as a class, but calls it as any factory (its own docs pass a lambda).
    realm.chainedProtocolFactory = lambda: insults.ServerProtocol(  # type: ignore[assignment,misc]
        manhole.ColoredManhole, namespace)
    portal = Portal(cast(IRealm, realm), [SSHPublicKeyChecker(AuthorizedKeysFile(authorized_keys))])
    factory = manhole_ssh.ConchFactory(portal)
    key = host_key(state_dir)
    factory.publicKeys = {key.sshType(): key.public()}
    # Twisted annotates this as bytes values, but SSHFactory wants Key objects there.
    factory.privateKeys = {key.sshType(): key}  # type: ignore[dict-item]
    factory.noisy = False
    return factory
