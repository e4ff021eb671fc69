"""CL4SRec's contrastive loss as it was written before its length groups and its last block at the read
positions only (kept literally, so that tests can check that the new one computes the same loss and
gradients)."""
import torch

from backbones.cl4srec import CL4SRec, nt_xent
from data import SequenceBatch
from model.decoder import gather_states


class ReferenceCL4SRec(CL4SRec):
    def contrastive_loss(self, batch: SequenceBatch, generator: torch.Generator | None = None) -> torch.Tensor:
        views, lengths = self.views(batch, generator)
        B, W = views.size(1), int(lengths.max())  # crops are shorter than their rows
        hidden = self.encoder.encode(views[..., :W].reshape(2 * B, W))  # (2B, W, H), both views in one pass
        z = gather_states(hidden, lengths.reshape(2 * B) - 1)  # (2B, H), each view's last real state
        return nt_xent(z[:B], z[B:], self.config.temperature)
