"""Cascade error correction (Brassard & Salvail, EUROCRYPT '93), as two sans-IO ends.

Bob holds the noisy copy and drives: :meth:`CascadeBob.queries` returns the parities he needs
(``(pass, start, end)``: the parity of Alice's bits at positions ``perm[pass][start:end]``), Alice
answers them with :meth:`CascadeAlice.answer`, Bob feeds the answers back with
:meth:`CascadeBob.receive`, until :attr:`CascadeBob.done`.  Every answered parity is one bit
disclosed to Eve, so :attr:`CascadeBob.leaked_bits` (the number of answers) is what privacy
amplification must subtract.

The algorithm is the original one: pass ``i`` cuts a fresh pseudo-random permutation of the key into
blocks of ``k1 * 2**i`` bits (``k1 = ceil(0.73 / QBER)``); a block whose parity differs from Alice's
is bisected (BINARY) down to one wrong bit, which Bob flips; the flip changes the parity of the block
holding that bit in every earlier pass, so those blocks are bisected again (the cascade).  The
searches of one pass run in parallel, one parity per search per round trip; Alice's parities of
every (sub)block already asked are remembered, so a cascaded search asks only what it does not know.
The permutations come from a public seed both ends share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ..exceptions import ConfigurationError, RemoteProtocolError

__all__ = ["CascadeAlice", "CascadeBob", "CascadeParams", "Query", "reconcile"]

Query = tuple[int, int, int]  # (pass, start, end) in that pass's permuted order


@dataclass(frozen=True)
class CascadeParams:
    """What both ends must agree on: key length, first block size, number of passes, permutation seed."""

    n: int
    k1: int
    passes: int
    seed: int

    @classmethod
    def for_qber(cls, n: int, qber: float, seed: int, passes: int = 4) -> CascadeParams:
        # 0.73/QBER is the block size Brassard & Salvail chose so a first-pass block has about one
        # error in expectation; the floor keeps it sane for an (unlikely) error-free sample.
        k1 = max(4, math.ceil(0.73 / max(qber, 0.005)))
        return cls(n=n, k1=min(k1, max(n, 1)), passes=passes, seed=seed)

    def __post_init__(self) -> None:
        if self.n <= 0 or self.k1 <= 0 or not 1 <= self.passes <= 16:
            raise ConfigurationError("bad Cascade parameters", field="cascade")

    def block_size(self, p: int) -> int:
        return min(self.n, self.k1 << p)

    def permutations(self) -> list[NDArray[np.int64]]:
        rng = np.random.default_rng(self.seed)
        return [rng.permutation(self.n).astype(np.int64) for _ in range(self.passes)]


def _check(params: CascadeParams, queries: list[Query]) -> None:
    for p, lo, hi in queries:
        if not (0 <= p < params.passes and 0 <= lo < hi <= params.n):
            raise RemoteProtocolError("Cascade query out of range")


class CascadeAlice:
    """Alice's end: answers parity queries on her (reference) bits."""

    def __init__(self, bits: NDArray[np.uint8], params: CascadeParams) -> None:
        if len(bits) != params.n:
            raise ConfigurationError("key length differs from the Cascade parameters", field="bits")
        self._bits = bits
        self.params = params
        self._perms = params.permutations()
        self.answered = 0

    def __repr__(self) -> str:
        return f"CascadeAlice(n={self.params.n}, answered={self.answered})"

    def answer(self, queries: list[Query]) -> list[int]:
        _check(self.params, queries)
        self.answered += len(queries)
        return [int(self._bits[self._perms[p][lo:hi]].sum() & 1) for p, lo, hi in queries]


class CascadeBob:
    """Bob's end: corrects his copy with the parities he asks for."""

    def __init__(self, bits: NDArray[np.uint8], params: CascadeParams) -> None:
        if len(bits) != params.n:
            raise ConfigurationError("key length differs from the Cascade parameters", field="bits")
        self.params = params
        self._bits = bits.astype(np.uint8, copy=True)
        self._perms = params.permutations()
        self._pos = [np.argsort(perm) for perm in self._perms]
        # Bob's bits in each pass's order, kept in step on every flip: parities become sums of slices.
        self._pb = [self._bits[perm] for perm in self._perms]
        self._known: dict[Query, int] = {}       # Alice's parities learnt so far
        self._searches: list[list[int]] = []     # [pass, block, lo, hi]: Alice's parity of lo:hi known
        self._new: list[list[int]] = []          # searches started while others run
        self._top_checked = False
        self._active: set[tuple[int, int]] = set()
        self._pass = -1                          # the pass whose top-level parities are being asked
        self._pending: list[tuple[int, Query]] = []  # (search number or -1, query) sent, not answered
        self.leaked_bits = 0
        self.rounds = 0
        self.corrected = 0
        self.done = False
        self._advance()

    def __repr__(self) -> str:
        return f"CascadeBob(n={self.params.n}, pass={self._pass}, leaked={self.leaked_bits}, done={self.done})"

    @property
    def bits(self) -> NDArray[np.uint8]:
        """Bob's corrected copy (only meaningful once :attr:`done`)."""
        return self._bits

    def queries(self) -> list[Query]:
        return [q for _, q in self._pending]

    def receive(self, parities: list[int]) -> None:
        if len(parities) != len(self._pending) or any(b not in (0, 1) for b in parities):
            raise RemoteProtocolError("Cascade answer does not match the queries")
        if self.rounds >= 64 * self.params.passes:
            raise RemoteProtocolError("Cascade does not converge: too many round trips")
        self.leaked_bits += len(parities)
        self.rounds += 1
        for (_, q), bit in zip(self._pending, parities, strict=True):
            self._known[q] = bit
        self._pending = []
        self._advance()

    # -- internals --------------------------------------------------------------------------------

    def _parity(self, p: int, lo: int, hi: int) -> int:
        return int(self._pb[p][lo:hi].sum() & 1)

    def _block(self, p: int, b: int) -> Query:
        k = self.params.block_size(p)
        return (p, b * k, min((b + 1) * k, self.params.n))

    def _start_pass(self, p: int) -> None:
        k = self.params.block_size(p)
        n_blocks = -(-self.params.n // k)
        self._pending = [(-1, self._block(p, b)) for b in range(n_blocks)]

    def _maybe_search(self, p: int, b: int) -> None:
        q = self._block(p, b)
        if (p, b) not in self._active and self._parity(*q) != self._known[q]:
            self._active.add((p, b))
            self._new.append([p, b, q[1], q[2]])

    def _flip(self, index: int) -> None:
        if self.corrected >= self.params.n // 4 + 16:
            # Honest parities fix each error once; this many flips means the answers contradict
            # each other (altered in flight), and the searches could chase them for ever.
            raise RemoteProtocolError("Cascade does not converge: the parities received are inconsistent")
        self._bits[index] ^= 1
        for p in range(self.params.passes):
            self._pb[p][self._pos[p][index]] ^= 1
        self.corrected += 1
        for p in range(self._pass + 1):
            b = int(self._pos[p][index]) // self.params.block_size(p)
            self._maybe_search(p, b)

    def _advance(self) -> None:
        """Run every search as far as known parities allow; queue the next queries."""
        while True:
            if self._pass >= 0 and not self._top_checked:
                self._top_checked = True
                k = self.params.block_size(self._pass)
                for b in range(-(-self.params.n // k)):
                    self._maybe_search(self._pass, b)
            queue = self._searches + self._new
            self._new = []
            waiting: list[list[int]] = []
            while queue:
                search = queue.pop()
                if self._step(search):
                    waiting.append(search)
                queue.extend(self._new)
                self._new = []
            self._searches = waiting
            if waiting:
                self._pending = [(i, (p, lo, (lo + hi) // 2)) for i, (p, _b, lo, hi) in enumerate(waiting)]
                return
            if self._pass + 1 >= self.params.passes:
                self.done = True
                self._pending = []
                return
            self._pass += 1
            self._top_checked = False
            self._start_pass(self._pass)
            return

    def _step(self, s: list[int]) -> bool:
        """Advance one search as far as known parities go; True when it needs a query."""
        p, b, lo, hi = s
        while True:
            known = self._known.get((p, lo, hi))
            if known is None or self._parity(p, lo, hi) == known:
                # Even now (another search fixed its error): the block may still be odd elsewhere.
                self._active.discard((p, b))
                self._maybe_search(p, b)
                return False
            if hi - lo == 1:
                self._active.discard((p, b))
                self._flip(int(self._perms[p][lo]))  # a parity mismatch of one bit: that bit is wrong
                return False
            mid = (lo + hi) // 2
            left = self._known.get((p, lo, mid))
            if left is None:
                s[2], s[3] = lo, hi
                return True
            self._known.setdefault((p, mid, hi), known ^ left)
            if self._parity(p, lo, mid) != left:
                hi = mid
            else:
                lo = mid


def reconcile(alice_bits: NDArray[np.uint8], bob_bits: NDArray[np.uint8], qber: float, seed: int,
              passes: int = 4) -> tuple[NDArray[np.uint8], int, int]:
    """Run both ends in memory; return Bob's corrected bits, the bits leaked and the round trips."""
    params = CascadeParams.for_qber(len(alice_bits), qber, seed, passes)
    alice, bob = CascadeAlice(alice_bits, params), CascadeBob(bob_bits, params)
    while not bob.done:
        bob.receive(alice.answer(bob.queries()))
    return bob.bits, bob.leaked_bits, bob.rounds
