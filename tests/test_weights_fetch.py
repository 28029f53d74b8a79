"""`tl weights fetch` against a local HTTP server standing in for download.pytorch.org."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest
import torch
import torchvision

from tests.helpers import tl
from tl_cli.backbones.factory import create_backbone
from tl_cli.backbones.weights import load_weights


@pytest.fixture
def server(tmp_path):
    """Serves tmp_path/www on 127.0.0.1; /broken/* answers 500 after half a body."""
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):
            if self.path.startswith("/broken/"):
                self.send_response(200)
                self.send_header("Content-Length", "1000000")
                self.end_headers()
                self.wfile.write(b"\0" * 1000)  # then the connection closes: a truncated download
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_fetch_fills_the_cache_and_offline_runs_use_it(server, tmp_path, monkeypatch, capsys):
    root, url = server
    reference = torchvision.models.resnet18()
    file_name = torchvision.models.ResNet18_Weights.DEFAULT.url.rsplit("/", 1)[1]
    torch.save(reference.state_dict(), root / file_name)
    monkeypatch.setenv("TL_TORCHVISION_MIRROR", url)
    assert tl("weights", "fetch", "torchvision:resnet18") == 0
    cached = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    assert cached.is_file() and str(cached) in capsys.readouterr().out
    # later, on a compute node: no mirror, no network; the cache answers
    monkeypatch.delenv("TL_TORCHVISION_MIRROR")
    (root / file_name).unlink()
    backbone = create_backbone("torchvision:resnet18")
    load_weights(backbone, "imagenet")
    assert torch.equal(backbone.module.conv1.weight, reference.conv1.weight)


def test_failed_download_leaves_nothing_behind(server, monkeypatch, capsys):
    _, url = server
    monkeypatch.setenv("TL_TORCHVISION_MIRROR", f"{url}/broken")
    assert tl("weights", "fetch", "torchvision:resnet18") == 2
    err = capsys.readouterr().err
    assert "could not be downloaded" in err and "tl weights fetch torchvision:resnet18" in err
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())
    monkeypatch.setenv("TL_TORCHVISION_MIRROR", f"{url}/missing")  # 404
    assert tl("weights", "fetch", "torchvision:resnet18") == 2
    assert not checkpoints.exists() or not any(checkpoints.iterdir())
