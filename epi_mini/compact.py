"""Compact storage for EPI's state: the isolated set as packed bits (1/8 byte per parameter).

The default stores the isolated set as int32 indices, 4 bytes per *isolated* entry (4*rho bytes per
parameter): the fastest to apply at every step. As bits it costs 1/8 byte per parameter whatever rho is
(smaller for rho > 3%), and is unpacked to indices at every step.
"""
import torch

_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def pack_bits(indices, numel):
    """Flat indices of a ``numel``-entry tensor -> uint8 bytes, bit ``i % 8`` of byte ``i // 8`` set for each."""
    bits = torch.zeros(-(-numel // 8) * 8, dtype=torch.bool, device=indices.device)
    bits[indices.long()] = True
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=indices.device)
    return (bits.view(-1, 8).to(torch.uint8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(packed, numel):
    """The inverse of :func:`pack_bits`: sorted int32 flat indices."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = ((packed.unsqueeze(1) >> shifts) & 1).view(-1)[:numel]
    return bits.nonzero().squeeze(1).to(torch.int32)
