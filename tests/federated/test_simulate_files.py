"""federated.simulate from Python writes its private outputs (per-round counts and losses, checkpoints) for
the owner only, whatever the caller's umask (review F3), and restores the caller's umask."""
import glob
import os
import stat

import pytest

from federated import SimulationConfig, simulate
from tests.conftest import make_adult_sample


def test_simulate_writes_nothing_other_users_can_read_under_umask_022(tmp_path):
    data = make_adult_sample(str(tmp_path / "data"), train_rows=300, eval_rows=100)
    out = str(tmp_path / "shared" / "out")
    os.makedirs(os.path.dirname(out), mode=0o755)
    old = os.umask(0o022)
    try:
        simulate(SimulationConfig(data_dir=data, output_dir=out, clients=10, clients_per_round=5, rounds=2,
                                  dp_noise_multiplier=1.0, checkpoint_every=1, plot=False, hidden=(8,),
                                  eval_every=0, privacy={"ledger": str(tmp_path / "ledger.sqlite")}),
                 log=lambda m: None)
        assert os.umask(0o022) == 0o022   # the caller's umask is back
    finally:
        os.umask(old)
    written = [out] + glob.glob(os.path.join(out, "**"), recursive=True)
    assert any(p.endswith("metrics.json") for p in written) and any("checkpoints" in p for p in written)
    opened = {os.path.relpath(p, out): oct(stat.S_IMODE(os.stat(p).st_mode)) for p in written
              if stat.S_IMODE(os.stat(p).st_mode) & 0o077}
    assert opened == {}


def test_an_existing_output_directory_open_to_others_is_refused_before_anything_runs(tmp_path):
    from core.private_files import OpenDirectoryError

    out = str(tmp_path / "open")
    os.makedirs(out)
    os.chmod(out, 0o755)
    with pytest.raises(OpenDirectoryError, match="chmod 700"):
        simulate(SimulationConfig(data_dir=str(tmp_path / "nowhere"), output_dir=out), log=lambda m: None)
    assert os.listdir(out) == []
