"""The API image has no torch: service/, the client and ``recalib submit`` must not import it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.live import REPO_ROOT

PROBE = """
import sys
from pathlib import Path
from recalib.settings import Settings
import service.main
settings = Settings(redis_url="redis://127.0.0.1:1/0", data_dir=Path(sys.argv[1]))
app = service.main.create_app(settings)
app.openapi()
import recalib.client, recalib.commands.submit
from recalib.cli import main
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print("TORCH:" + ",".join(loaded))
"""


def test_service_client_and_submit_do_not_import_torch(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "TORCH:\n" in result.stdout, result.stdout  # an empty list of torch modules
