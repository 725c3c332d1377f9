"""Where pretrained weights come from (svhn.model.backbones): the hub named by HF_ENDPOINT
(a mirror) or huggingface.co, checked before timm's retries, and HF_HUB_OFFLINE (the local
Hugging Face cache only, no network). Only 127.0.0.1 is ever contacted here; no weights are
downloaded."""

import http.server
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from helpers.repository import REPO
from huggingface_hub.errors import LocalEntryNotFoundError

from svhn.errors import SettingError
from svhn.model.backbones import create_backbone


class _QuietHandler(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@contextmanager
def local_hub() -> Iterator[tuple[str, int]]:
    """A tiny HTTP server on 127.0.0.1 (a free port) standing in for a mirror; stopped and
    its port closed when the block ends."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server.server_address[:2]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound once, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def fake_timm(monkeypatch) -> list[tuple]:
    """timm.create_model recorded, not run: no download; the calls made land in the list."""
    calls = []
    monkeypatch.setattr("svhn.model.backbones.timm.create_model",
                        lambda *a, **k: calls.append(a) or torch.nn.Identity())
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return calls


def test_a_mirror_in_hf_endpoint_is_the_host_checked(monkeypatch, fake_timm):
    with local_hub() as (host, port):
        monkeypatch.setenv("HF_ENDPOINT", f"http://{host}:{port}/")
        create_backbone("resnet18", pretrained=True)  # the mirror answers: no refusal
        assert len(fake_timm) == 1
    with pytest.raises(SettingError) as error:  # the same mirror, stopped
        create_backbone("resnet18", pretrained=True)
    message = str(error.value)
    assert f"from http://127.0.0.1:{port} (HF_ENDPOINT), but 127.0.0.1:{port} cannot be " \
           "reached" in message
    assert "huggingface.co" not in message and "--model.pretrained_weights FILE" in message
    assert len(fake_timm) == 1  # refused before timm was asked


@pytest.mark.parametrize(("endpoint", "tried"), [
    (None, ("huggingface.co", 443)),
    ("", ("huggingface.co", 443)),
    ("https://hf-mirror.com", ("hf-mirror.com", 443)),
    ("http://mirror.internal/", ("mirror.internal", 80)),
    ("https://mirror.internal:8443/hub", ("mirror.internal", 8443)),
    ("http://[::1]:8080", ("::1", 8080)),
])
def test_hf_endpoint_gives_host_and_port(monkeypatch, fake_timm, endpoint, tried):
    addresses = []
    monkeypatch.setattr("svhn.model.backbones.socket.create_connection",
                        lambda address, timeout: addresses.append(address) or socket.socket())
    if endpoint is None:
        monkeypatch.delenv("HF_ENDPOINT", raising=False)
    else:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
    create_backbone("resnet18", pretrained=True)
    assert addresses == [tried]


@pytest.mark.parametrize("endpoint", ["hf-mirror.com", "ftp://mirror.internal",
                                      "http://mirror.internal:port"])
def test_an_hf_endpoint_that_is_no_address_is_refused(monkeypatch, fake_timm, endpoint):
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    with pytest.raises(SettingError, match=f"HF_ENDPOINT='{endpoint}': not a hub address"):
        create_backbone("resnet18", pretrained=True)


def test_hub_offline_without_cached_weights_says_so_without_a_network_attempt(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a network attempt although HF_HUB_OFFLINE is set")

    def hub_offline_cache_miss(*args, **kwargs):  # what huggingface_hub raises then
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("svhn.model.backbones.socket.create_connection", no_network)
    monkeypatch.setattr("svhn.model.backbones.timm.create_model", hub_offline_cache_miss)
    with pytest.raises(SettingError, match="HF_HUB_OFFLINE is set") as error:
        create_backbone("resnet18", pretrained=True)
    assert "--model.pretrained_weights FILE" in str(error.value)


def test_hub_offline_with_an_empty_cache_through_the_real_hub(tmp_path):
    # The real timm and huggingface_hub, offline, with an empty cache: one error line. The
    # endpoint is a closed local port, so even a stray attempt would not leave 127.0.0.1.
    script = ("import sys\n"
              "from svhn.errors import command\n"
              "from svhn.model.backbones import create_backbone\n"
              "sys.exit(command(lambda argv: create_backbone('resnet18', pretrained=True) "
              "and None)(None))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"),
           "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, text=True,
                            capture_output=True, timeout=300, env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("error: backbone 'resnet18' with pretrained: true: "
                                    "HF_HUB_OFFLINE is set"), result.stderr[-2000:]
