"""Suite-wide settings and fixtures (helpers live in the `support` package: tests/support/)."""
import pytest
import torch

from support.common import SMALL

# Tests use tiny shapes, where one thread is fastest; more threads than free cores (2 here, shared
# with subprocess ranks) make every matmul spin-wait and slow the suite by an order of magnitude.
torch.set_num_threads(1)


@pytest.fixture
def small_args(tmp_path):
    """SMALL overrides plus a run dir and data cache inside the test's tmp dir."""
    return SMALL + [f"hydra.run.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"]
