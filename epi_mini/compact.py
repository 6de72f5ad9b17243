"""Compact storage for EPI's state: the isolated set as bits or byte-coded gaps, the importance EMA in 8 bits.

The default stores the isolated set as int32 indices, 4 bytes per *isolated* entry (4 rho bytes per
parameter). Two smaller forms, decoded to indices at every step:

* ``bits``: one bit per parameter, 1/8 byte whatever rho is; decoding reads all N bits.
* ``gaps``: the distances between consecutive isolated entries, one byte each (a distance above 255 takes
  one more byte per 255): about rho bytes per parameter -- smaller than bits for rho < 1/8 -- and decoding
  reads only those bytes (a cumulative sum), so it costs O(rho N) per step instead of O(N).

The EMA costs 4 bytes per parameter in float32, 2 in bfloat16, and 1.03 as :class:`BlockwiseEMA8`; with the
gaps at rho = 0.1, EPI's whole state is 1.13 bytes per parameter.

The 8-bit EMA reads a float's bit pattern as an integer; so does :func:`kth_largest`, the exact, sort-free
threshold of EPI's global top-rho selection (:func:`epi_mini.epi.top_fraction`).
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


def pack_gaps(indices):
    """Sorted flat indices -> uint8 codes: each index's distance from the previous one (the first from -1),
    minus one, written as bytes of 255 while it is 255 or more, then its remainder (0-254)."""
    gaps = torch.diff(indices.long(), prepend=torch.full((1,), -1, device=indices.device)) - 1   # >= 0
    fillers = gaps // 255
    codes = torch.full((int(fillers.sum()) + gaps.numel(),), 255, dtype=torch.uint8, device=indices.device)
    codes[torch.cumsum(fillers + 1, 0) - 1] = (gaps - 255 * fillers).to(torch.uint8)
    return codes


def unpack_gaps(codes):
    """The inverse of :func:`pack_gaps`: the running sum of the bytes at each final (< 255) byte is the
    index minus the number of indices before it. Returns int64 flat indices."""
    ends = codes != 255
    return torch.cumsum(codes, 0, dtype=torch.int64)[ends] + torch.arange(int(ends.sum()), device=codes.device)


class BlockwiseEMA8:
    """EPI's importance EMA in 8 bits per entry, plus one float per block of ``block`` entries.

    The scores span many orders of magnitude (a squared gradient can be 1e-12 in one entry and 1e-2 in the
    next), so a *linear* 8-bit code scaled by each block's maximum would round most of a block to 0. The code
    here is a tiny float instead: each value is stored relative to its block's maximum, ``rel = v / max`` in
    (0, 1], as 4 exponent bits and 4 mantissa bits -- the top byte of ``rel``'s float32 bit pattern below the
    sign. That covers 16 octaves below the block's maximum in steps of 3-6% (anything smaller reads as
    2**-15 of the maximum, far below any top-rho threshold), and converting either way is integer shifts.

    The EMA update happens in float32 on a transient buffer. Writing it back rounds *stochastically* (add a
    uniform fraction of the last kept bit, then truncate), so the expected value is exact: with
    round-to-nearest, an increment of (1 - beta) = 1% of a value, below half a step, would be lost every time
    and the EMA would stall. The uniform fractions come from a Weyl sequence per entry (``entry * C1 + step * C2``,
    high bits): a few integer operations, no random generator, and an exact replay on resume. (One fraction
    shared by all entries would be cheaper and selects as well, but its rounding errors add up across entries:
    the sum of the EMA then wanders by +-8% instead of +-0.3%.)

    State: ``codes`` (uint8, every tensor in one buffer, each padded to whole blocks, so that no block mixes two
    tensors' scales), ``scales`` (float32, one per block) and the step counter: 1 + 4 / block bytes per
    parameter (1.016 at block = 256), plus the padding (1.028 in all on the ``cpu`` preset's model).
    """
    exponent_bits, mantissa_bits = 4, 4

    def __init__(self, shapes, device="cpu", block=256):
        self.shapes, self.block = dict(shapes), block
        self.sizes = {n: torch.Size(s).numel() for n, s in self.shapes.items()}
        self.padded = {n: -(-k // block) * block for n, k in self.sizes.items()}
        total = sum(self.padded.values())
        self.codes = torch.zeros(total, dtype=torch.uint8, device=device)
        self.scales = torch.zeros(total // block, dtype=torch.float32, device=device)
        self.shift = 23 - self.mantissa_bits                        # float32 bits below the kept mantissa
        self.offset = (127 - 2 ** self.exponent_bits + 1) << 23     # code 0 <-> exponent of 2**-15
        self.steps = 0

    def dequantize(self):
        """All values, float32, in one padded buffer (transient: 4 bytes per parameter while it lives)."""
        rel = ((self.codes.to(torch.int32) << self.shift) + self.offset).view(torch.float32)
        return (rel.view(-1, self.block) * self.scales[:, None]).view(-1)

    def _slices(self, flat):
        out, start = {}, 0
        for n, k in self.padded.items():
            out[n] = flat[start:start + self.sizes[n]].view(self.shapes[n])
            start += k
        return out

    def values(self):
        """name -> float32 tensor of the current values (dequantized, transient)."""
        return self._slices(self.dequantize())

    @torch.no_grad()
    def update(self, increments, beta, keep=None):
        """``v <- beta * v + (1 - beta) * increment`` for the entries of ``increments`` (name -> tensor >= 0;
        names absent keep their values), then stochastic rounding back to 8 bits. ``keep``: a 0-dim device
        tensor, 1 to update, 0 to leave everything exactly as it was (a skipped step, decided on the device)."""
        v = self.dequantize()
        for n, part in self._slices(v).items():
            if n in increments:  # (a non-finite increment with keep = 0 is computed, then dropped below)
                part.mul_(beta).add_(increments[n].to(torch.float32), alpha=1 - beta)
        old = (self.codes, self.scales)
        blocks = v.view(-1, self.block)
        self.scales = blocks.amax(1)
        rel = (blocks / torch.where(self.scales > 0, self.scales, 1.0)[:, None]).view(-1)
        self.steps += 1
        entry = torch.arange(rel.numel(), dtype=torch.int32, device=rel.device)
        weyl = entry * -1640531535 + ((self.steps * -2048144777) % 2**32 - 2**31)  # int32 arithmetic wraps
        fraction = (weyl >> (32 - self.shift)) & ((1 << self.shift) - 1)          # uniform in [0, 2**shift)
        self.codes = ((rel.view(torch.int32) - self.offset + fraction) >> self.shift).clamp_(0, 255).to(torch.uint8)
        if keep is not None:
            self.codes, self.scales = (torch.where(keep > 0, new, was) for new, was in zip((self.codes, self.scales), old))

    @property
    def nbytes(self):
        return self.codes.numel() + 4 * self.scales.numel()

    def state_dict(self):
        return {"codes": self.codes.clone(), "scales": self.scales.clone(), "steps": self.steps}

    def load_state_dict(self, state):
        if state["codes"].shape != self.codes.shape:
            raise ValueError(f"8-bit importance state of {state['codes'].numel()} codes, expected {self.codes.numel()}")
        self.codes, self.scales = state["codes"].to(self.codes.device), state["scales"].to(self.scales.device)
        self.steps = state["steps"]


# --- the k-th largest score, for a global top-rho selection without a sort ---------------------------------------
def kth_largest(flat, k, method="auto"):
    """The k-th largest value of a flat float tensor, exactly: ``kthvalue`` (quickselect on a copy, O(N)),
    ``topk`` (a partial sort, O(N log k)) or ``histogram``: the float32 bit pattern of a non-negative number
    grows with its value, so its top 16 bits are a bin index in value order; one ``bincount`` finds the bin
    that holds the k-th largest entry, and ``kthvalue`` on that bin's few entries finishes the job (O(N), three
    cheap passes; any float dtype: a float64 value rounded to float32 keeps its order). ``"auto"``: the fastest
    measured by ``benchmarks/cost.py`` (kthvalue below 2**18 entries)."""
    if method == "auto":
        method = "kthvalue" if flat.numel() < 2**18 else "histogram"
    if method == "kthvalue":
        return torch.kthvalue(flat, flat.numel() - k + 1).values
    if method == "topk":
        return torch.topk(flat, k, sorted=False).values.min()
    low = flat.min()
    values = flat - low if low < 0 else flat  # z-scores: the same order, shifted to >= 0
    bins = (values.float().view(torch.int32) >> 15).clamp_(min=0)  # -0.0 has the sign bit set: it is 0
    above = torch.bincount(bins, minlength=1 << 16).flip(0).cumsum(0)  # entries in the top j + 1 bins
    j = int(torch.searchsorted(above, k))
    inside = flat[bins == (1 << 16) - 1 - j]
    need = k - (int(above[j - 1]) if j > 0 else 0)
    return torch.kthvalue(inside, inside.numel() - need + 1).values
