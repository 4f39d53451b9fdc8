"""PSISGD over psiopt.param_groups inside Lightning: fit, then resume from a checkpoint, bit-exact."""

from __future__ import annotations

import pytest
import torch
from _nets import three_groupings_net
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import psiopt

L = pytest.importorskip("lightning")

DT = torch.float64


class Classifier(L.LightningModule):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self.net = three_groupings_net(seed)
        gen = torch.Generator().manual_seed(7)
        self.example = torch.randn(6, 3, 8, 8, generator=gen, dtype=DT)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        groups = psiopt.param_groups(self.net, self.example, scale_invariant={"lr": 0.05})
        return psiopt.PSISGD(groups, lr=0.1, momentum=0.9, nesterov=True)


def _data():
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(12, 3, 8, 8, generator=gen, dtype=DT), torch.randint(0, 3, (12,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=6, shuffle=False)


def _trainer(root, epochs):
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )


# Lightning's own advice (worker processes for the data loader, few batches) is noise here, and
# Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates.
@pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning")
def test_fit_then_resume_from_checkpoint_is_bit_exact(tmp_path):
    straight = Classifier(seed=0)
    _trainer(tmp_path, epochs=2).fit(straight, _data())

    first = Classifier(seed=0)
    trainer = _trainer(tmp_path, epochs=1)
    trainer.fit(first, _data())
    ckpt = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["optimizer_states"][0]["param_groups"]
    assert [g.get("grouping") for g in saved] == ["channel", "block(2)", "tensor", None]

    resumed = Classifier(seed=1)  # other weights: all of them must come from the checkpoint
    _trainer(tmp_path, epochs=2).fit(resumed, _data(), ckpt_path=ckpt)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    initial = three_groupings_net(0).state_dict()
    moved = [n for n, p in initial.items() if not torch.equal(p, straight.net.state_dict()[n])]
    assert "0.weight" in moved and "3.weight" in moved  # training did move the weights
