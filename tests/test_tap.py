"""
C{twistd portrouter}'s options and the service they make, without starting it.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import IService, IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins

from portrouter.config import with_cli
from portrouter.model import Config, Listen, Manhole
from portrouter.router import RouterService
from portrouter.table import Route
from portrouter.tap import Options, makeService

OPTION_KEYS = ("config", "ingress", "manhole", "state", "routes")


def parsed(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def plain(options: Options) -> dict[str, Any]:
    return {key: options[key] for key in OPTION_KEYS}


def test_no_options() -> None:
    options = parsed()
    assert plain(options) == {
        "config": None, "ingress": None, "manhole": None, "state": None, "routes": [],
    }
    assert options["parsed"] == Config()


def test_repeatable_routes_keep_their_order() -> None:
    options = parsed(
        "--http", "tcp:3000 -> tcp:127.0.0.1:3001",
        "--tcp", "tcp:5000 -> tcp:127.0.0.1:6000",
        "--udp", "udp:5353 -> 127.0.0.1:53",
        "--ws", "tcp:7000 -> tcp:127.0.0.1:5900",
        "--http", "tcp:3100:interface=127.0.0.1 -> unix:/run/app.sock",
        "--tcp", "tcp:5001 -> tcp:127.0.0.1:6001",
        "--ingress", "tcp:0:interface=127.0.0.1",
        "--state", "/var/lib/portrouter",
        "--manhole", "tcp:2222:interface=127.0.0.1",
    )
    assert plain(options) == {
        "config": None,
        "ingress": "tcp:0:interface=127.0.0.1",
        "manhole": "tcp:2222:interface=127.0.0.1",
        "state": "/var/lib/portrouter",
        "routes": [
            ("http", "tcp:3000 -> tcp:127.0.0.1:3001"),
            ("tcp", "tcp:5000 -> tcp:127.0.0.1:6000"),
            ("udp", "udp:5353 -> 127.0.0.1:53"),
            ("ws", "tcp:7000 -> tcp:127.0.0.1:5900"),
            ("http", "tcp:3100:interface=127.0.0.1 -> unix:/run/app.sock"),
            ("tcp", "tcp:5001 -> tcp:127.0.0.1:6001"),
        ],
    }
    config = options["parsed"]
    assert [p.name for p in config.projects] == [
        "http-3000", "tcp-5000", "udp-5353", "ws-7000", "http-3100", "tcp-5001",
    ]
    assert (config.ingress, config.state) == ("tcp:0:interface=127.0.0.1", "/var/lib/portrouter")
    assert config.manhole is not None and config.manhole.listen == "tcp:2222:interface=127.0.0.1"


def test_each_options_instance_has_its_own_routes() -> None:
    first = parsed("--tcp", "tcp:5000 -> tcp:127.0.0.1:6000")
    second = parsed()
    assert first["routes"] == [("tcp", "tcp:5000 -> tcp:127.0.0.1:6000")]
    assert second["routes"] == []


@pytest.fixture
def routes_file(tmp_path: Path) -> Path:
    path = tmp_path / "routes.yaml"
    path.write_text(textwrap.dedent("""\
        ingress: tcp:8080
        state: ./file-state
        projects:
          - {name: web, backend: "tcp:127.0.0.1:4000"}
          - {name: my-api, backend: "tcp:127.0.0.1:3001", listen: {port: 3000}}
        """))
    return path


@pytest.mark.parametrize("flag", ["--config", "-c"])
def test_config_file_and_cli(routes_file: Path, flag: str) -> None:
    options = parsed(flag, str(routes_file), "--ingress", "tcp:9090", "--udp", "udp:5353 -> 127.0.0.1:53")
    assert plain(options) == {
        "config": str(routes_file), "ingress": "tcp:9090", "manhole": None, "state": None,
        "routes": [("udp", "udp:5353 -> 127.0.0.1:53")],
    }
    config = options["parsed"]
    assert config.source == str(routes_file)
    assert config.ingress == "tcp:9090"
    assert config.state == "./file-state"
    assert [p.name for p in config.projects] == ["web", "my-api", "udp-5353"]


@pytest.mark.parametrize("argv, message", [
    (["--tcp", "tcp:5000"], "--tcp: 'tcp:5000' is not 'LISTEN -> BACKEND'"),
    (["--udp", "udp:5353 -> localhost"], "--udp: 'localhost' is not HOST:PORT"),
    (["--ingress", "nope:1"], "--ingress: 'nope:1' is not a listening endpoint: Unknown endpoint type: 'nope'"),
    (["--tcp", "tcp:8080 -> tcp:127.0.0.1:1"],
     "--tcp: port 8080/tcp is reserved for the ingress; project 'tcp-8080' cannot bind it"),
], ids=["no-arrow", "udp-backend", "ingress", "ingress-port"])
def test_bad_options_print_one_line(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as info:
        parsed(*argv)
    assert info.value.code == 1
    assert capsys.readouterr().err == message + "\n"


def test_bad_file_prints_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text("projects:\n  - {name: web, backend: 'tcp:127.0.0.1:1', listen: {port: 0}}\n")
    with pytest.raises(SystemExit) as info:
        parsed("--config", str(path))
    assert info.value.code == 1
    assert capsys.readouterr().err == f"{path}: projects[0].listen.port: 0 is not a port (1-65535)\n"


def test_make_service(routes_file: Path) -> None:
    options = parsed(
        "--config", str(routes_file),
        "--ingress", "tcp:0:interface=127.0.0.1",
        "--tcp", "tcp:5000 -> tcp:127.0.0.1:6000",
        "--udp", "udp:5353 -> 127.0.0.1:53",
        "--ws", "tcp:7000 -> tcp:127.0.0.1:5900",
        "--http", "tcp:3300 -> tcp:127.0.0.1:3301",
    )
    reactor = MemoryReactorClock()
    service = makeService(options, reactor=reactor)
    assert IService.providedBy(service)
    assert isinstance(service, RouterService)
    assert service.reactor is reactor
    assert service.config == options["parsed"]
    assert service.table.routes == (
        Route(0, "http", None, "path-based routing", "tcp:0:interface=127.0.0.1", interface="127.0.0.1"),
        Route(0, "http", "web", "tcp:127.0.0.1:4000", "tcp:0:interface=127.0.0.1", path="/web/"),
        Route(3000, "http", "my-api", "tcp:127.0.0.1:3001", "tcp:3000"),
        Route(3300, "http", "http-3300", "tcp:127.0.0.1:3301", "tcp:3300"),
        Route(5000, "tcp", "tcp-5000", "tcp:127.0.0.1:6000", "tcp:5000"),
        Route(5353, "udp", "udp-5353", "127.0.0.1:53", "udp:5353"),
        Route(7000, "ws", "ws-7000", "tcp:127.0.0.1:5900", "tcp:7000"),
    )
    assert service.table.projects["udp-5353"].listen == Listen("udp", 5353, None, "udp:5353")
    # Made, not started: nothing bound, nothing running.
    assert not service.running
    assert service.listeners == {}
    assert service.ingress is None
    assert reactor.tcpServers == [] and reactor.unixServers == [] and reactor.adoptedPorts == []
    assert reactor.getDelayedCalls() == []


def test_make_service_without_routes() -> None:
    service = makeService(parsed(), reactor=MemoryReactorClock())
    assert isinstance(service, RouterService)
    assert service.table.routes == (
        Route(8080, "http", None, "path-based routing", "tcp:8080"),
    )


def test_make_service_with_manhole() -> None:
    options = parsed("--manhole", "tcp:2222:interface=127.0.0.1")
    service = makeService(options, reactor=MemoryReactorClock())
    assert isinstance(service, RouterService)
    assert service.table.manhole == options["parsed"].manhole
    assert isinstance(service.table.manhole, Manhole)


def test_plugin_is_found() -> None:
    makers = {m.tapname: m for m in getPlugins(IServiceMaker)}
    maker = makers["portrouter"]
    assert maker.options is Options
    assert maker.makeService is makeService


def test_service_matches_with_cli() -> None:
    """The tap adds nothing to the config that C{with_cli} did not make."""
    options = parsed("--tcp", "tcp:5000 -> tcp:127.0.0.1:6000")
    assert options["parsed"] == with_cli(Config(), routes=[("tcp", "tcp:5000 -> tcp:127.0.0.1:6000")])
