import pytest
import torch


@pytest.fixture
def keeps_autograd():
    """The scripts switch autograd off for their process; run in this one, it is restored for the tests after."""
    grad = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(grad)
