"""Tree drafting for the self-drafter: several candidates per position, verified in one pass.

A linear draft dies at the first position where the head's top token is not the target's. At
batch 1 a verify pass of 12 rows costs about what a pass of 5 does (the step is paid per layer
and per kernel, not per row), so the round can carry the head's 2nd and 3rd choices too: when
the target's token is the head's second choice, a child of that node continues the path.

The tree is static (Medusa's "choices"; EAGLE-1's static trees): each node is the tuple of ranks
that leads to it from the root — ``(0,)`` is the head's top token after the root, ``(1,)`` its
second, ``(0, 1)`` the second choice after the top one. Static means every pass of a round has
a fixed row count and a fixed attention pattern, so drafting (depth by depth) and verification
each record as one CUDA graph, and no host sync happens until the accepted path is read.

Slots. A node's position is root + depth, but several nodes share a position, so their KV (and
the shallow output h_k) live in scratch slots at the end of every cache; a row reads the committed
slots (≤ the root's) and its ancestors' scratch slots (``node_mask``). The verify program also
finds the greedy path by tensor ops and copies its state from scratch to the slots after the root
(``tree_verify``), so a round's host work is reading D + 2 numbers.

Deep-context heads (the pair's ``final``, selfspec/pair.py). A node's previous position is its
parent: the root's children read the root's own head state (the root, a draft step, read the
target's final state of the position before it), deeper nodes their parent node's head state,
which drafting keeps in ``final``'s scratch row of that node (``TreeBuffers.parent_slot``). The verify
pass writes the target's final state of the root and of every node (scratch rows), and the commit
copies the accepted path's rows with its KV and h_k, so the next root reads the target's state of
the last accepted position; the pair then recomputes the accepted nodes' head KV from the target's
states at the next draft, as after a linear round (``SelfSpecPair.tree_committed``). A chain tree
(one node per depth) is exactly the linear deep round.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from compress.errors import CompressError

# A default found by reasoning, not search: depth 4 with the head's top 3 after the root, top 2
# after the best node, single continuations beyond. 11 nodes: the verify pass has 12 rows, within
# the engine's graph-recorded passes (GRAPH_ROWS).
DEFAULT_TREE: tuple[tuple[int, ...], ...] = (
    (0,), (1,), (2,),
    (0, 0), (0, 1), (1, 0),
    (0, 0, 0), (0, 0, 1), (0, 1, 0),
    (0, 0, 0, 0), (0, 0, 0, 1),
)


@dataclass
class DraftTree:
    """The static tree: nodes in depth order (then rank order), their parents and depths."""

    choices: tuple[tuple[int, ...], ...]
    parent: list[int] = field(init=False)  # -1: the root
    depth: list[int] = field(init=False)  # 1 .. max_depth
    rank: list[int] = field(init=False)

    def __post_init__(self):
        nodes = sorted({tuple(int(r) for r in c) for c in self.choices}, key=lambda c: (len(c), c))
        if not nodes:
            raise CompressError("a draft tree needs at least one node")
        index = {c: i for i, c in enumerate(nodes)}
        for c in nodes:
            if any(r < 0 for r in c):
                raise CompressError(f"draft tree node {list(c)}: ranks must be >= 0")
            if len(c) > 1 and c[:-1] not in index:
                raise CompressError(f"draft tree node {list(c)} has no parent {list(c[:-1])} in the tree")
        self.choices = tuple(nodes)
        self.parent = [index[c[:-1]] if len(c) > 1 else -1 for c in nodes]
        self.depth = [len(c) for c in nodes]
        self.rank = [c[-1] for c in nodes]

    @property
    def size(self) -> int:
        return len(self.choices)

    @property
    def max_depth(self) -> int:
        return max(self.depth)

    def at_depth(self, d: int) -> list[int]:
        return [i for i, dd in enumerate(self.depth) if dd == d]

    def children(self, i: int) -> list[int]:
        return [j for j, p in enumerate(self.parent) if p == i]

    def topk(self, d: int) -> int:
        """How many of the head's choices nodes at depth d need (d = 0: the root)."""
        ranks = [self.rank[j] for j in self.at_depth(d + 1)]
        return max(ranks) + 1 if ranks else 0

    def ancestors(self) -> torch.Tensor:
        """[N, N] bool: node i may read node j (j is i or an ancestor of i)."""
        anc = torch.zeros(self.size, self.size, dtype=torch.bool)
        for i in range(self.size):
            j = i
            while j >= 0:
                anc[i, j] = True
                j = self.parent[j]
        return anc


def as_tree(value) -> DraftTree | None:
    """None, "default", a DraftTree or a list of rank lists -> a DraftTree (or None)."""
    if value is None or isinstance(value, DraftTree):
        return value
    if value == "default":
        return DraftTree(DEFAULT_TREE)
    return DraftTree(tuple(tuple(c) for c in value))


def accept_path(tree: DraftTree, node_tokens: list[int], target_tokens: list[int]) -> tuple[list[int], int]:
    """Greedy acceptance on the host: from the root, follow the child whose token is the target's
    own greedy token at the current node, as long as one exists. ``target_tokens`` [1 + N]: the
    target's argmax at the root and at every node. Returns (accepted node indices, the next token)."""
    path: list[int] = []
    at = -1  # the root
    while True:
        want = target_tokens[at + 1]
        nxt = next((c for c in _children_cache(tree)[at] if node_tokens[c] == want), None)
        if nxt is None:
            return path, want
        path.append(nxt)
        at = nxt


def _children_cache(tree: DraftTree) -> dict[int, list[int]]:
    cached = getattr(tree, "_kids", None)
    if cached is None:
        cached = {i: tree.children(i) for i in range(-1, tree.size)}
        object.__setattr__(tree, "_kids", cached)
    return cached


# ---------------------------------------------------------------- programs on a SelfSpecPair (graph-safe)

class TreeBuffers:
    """The tree as device tensors for one engine: scratch slots, per-depth rows, masks, gathers."""

    def __init__(self, tree: DraftTree, max_len: int, device):
        n = tree.size
        self.tree, self.size, self.max_depth = tree, n, tree.max_depth
        self.scratch = torch.arange(max_len - n, max_len, device=device)  # node i's slot
        self.offset = torch.tensor(tree.depth, device=device)  # node i's position - the root's
        anc = torch.zeros(n, max_len, dtype=torch.bool)
        anc[:, max_len - n:] = tree.ancestors()
        self.reads = anc.to(device)  # [N, max_len]: the scratch slots node i reads
        self.rows = [torch.tensor(tree.at_depth(d), device=device, dtype=torch.long) for d in range(tree.max_depth + 1)]
        self.parent = torch.tensor(tree.parent, device=device)
        # node i's parent's scratch slot, -1 for the root's children (a deep head reads its final state)
        self.parent_slot = torch.tensor([max_len - n + j if j >= 0 else -1 for j in tree.parent], device=device)
        self.node_ids = torch.arange(n, device=device)
        self.depths = torch.arange(1, tree.max_depth + 1, device=device)
        self.k = [tree.topk(d) for d in range(tree.max_depth + 1)]
        # depth d+1 nodes take the (row of their parent among depth d's rows, rank) choice
        self.pick = []
        for d in range(tree.max_depth):
            parents = tree.at_depth(d) if d else [-1]
            kids = tree.at_depth(d + 1)
            self.pick.append((torch.tensor([parents.index(tree.parent[j]) for j in kids], device=device),
                              torch.tensor([tree.rank[j] for j in kids], device=device)))


def node_mask(pair, buf: TreeBuffers, rows: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """[len(rows), max_len]: committed slots up to the root's, and each node's own scratch path."""
    return (pair.engine.slots.unsqueeze(0) <= root) | buf.reads.index_select(0, rows)


def tree_draft(pair, buf: TreeBuffers, root_logits: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """Every node's token [N], depth by depth: the shallow blocks and the exit head on the nodes of
    depth d (writing their scratch KV and h_k) give the choices of depth d + 1. ``root_logits`` [V']:
    the head's trimmed logits after the root token at position ``root`` [1]."""
    e = pair.engine
    top = root_logits.unsqueeze(0).topk(buf.k[0], dim=-1).indices  # [1, k0]
    tokens = []
    for d in range(1, buf.max_depth + 1):
        parent_row, rank = buf.pick[d - 1]
        toks = pair.vocab_map.index_select(0, top[parent_row, rank])
        tokens.append(toks)
        if d == buf.max_depth or not buf.k[d]:
            continue
        rows = buf.rows[d]
        slots, pos = buf.scratch.index_select(0, rows), root + d
        pos = pos.expand(rows.numel())
        mask = node_mask(pair, buf, rows, root)
        h = e.run_layers(e.embed(toks), pos, 0, pair.k, slots=slots, mask=mask)
        pair.hidden.index_copy_(0, slots, h)
        prev = None
        if pair.deep:  # each node reads its parent's final state: the root's row, or the parent's scratch row
            ps = buf.parent_slot.index_select(0, rows)
            prev = torch.where(ps >= 0, ps, root.expand(rows.numel()))
        logits = pair.head_rows(h, pos, slots, mask, prev)
        top = logits.topk(buf.k[d], dim=-1).indices
    return torch.cat(tokens)


def tree_verify(pair, buf: TreeBuffers, node_tokens: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """Verify, accept and commit a tree round on the device: [m, path tokens (D, the first m valid),
    the target's next token] (int64, D + 2). The shallow blocks run on the deepest nodes (the only
    ones drafting did not run), the deep blocks on root + all nodes; the greedy path is found by
    tensor ops (``accept_on_device``) and the state of one node per depth — the accepted one where
    there is one — is copied to the slots after the root (beyond the path it is junk past the new
    length, overwritten later), so the host only reads D + 2 numbers."""
    want = target_tokens(pair, buf, node_tokens, root)
    m, chosen, nxt = accept_on_device(buf, node_tokens, want)
    tree_commit(pair, buf.scratch.index_select(0, chosen), root + buf.depths)
    return torch.cat([m.reshape(1), node_tokens.index_select(0, chosen), nxt.reshape(1)])


def accept_on_device(buf: TreeBuffers, node_tokens: torch.Tensor, want: torch.Tensor):
    """The greedy path by tensor ops (no host sync): a node is accepted when its token is the target's
    token at its parent and its parent is accepted. Siblings carry distinct tokens, so at most one node
    per depth is. Returns (m, the node chosen per depth [D] — the accepted one, else the depth's first —,
    the target's token after the path)."""
    accepted = []
    for d in range(1, buf.max_depth + 1):
        rows = buf.rows[d]
        parent = buf.parent.index_select(0, rows)  # -1: the root
        match = node_tokens.index_select(0, rows) == want.index_select(0, parent + 1)
        if d > 1:
            match = match & torch.cat(accepted).index_select(0, parent)
        accepted.append(match)
    acc = torch.cat(accepted)
    # index_select with 1-d indices throughout: indexing by a 0-d tensor would read it on the host
    chosen = torch.cat([buf.rows[d].index_select(0, acc.index_select(0, buf.rows[d]).int().argmax().reshape(1))
                        for d in range(1, buf.max_depth + 1)])
    last = (acc.long() * (buf.node_ids + 1)).max()  # the deepest accepted node + 1, or 0 (the root)
    return acc.sum(), chosen, want.index_select(0, last.reshape(1))[0]


def target_tokens(pair, buf: TreeBuffers, node_tokens: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """The target's greedy token [1 + N] at the root and at every node."""
    e = pair.engine
    leaves = buf.rows[buf.max_depth]
    lslots = buf.scratch.index_select(0, leaves)
    lmask = node_mask(pair, buf, leaves, root)
    h = e.run_layers(e.embed(node_tokens.index_select(0, leaves)), (root + buf.max_depth).expand(leaves.numel()),
                     0, pair.k, slots=lslots, mask=lmask)
    pair.hidden.index_copy_(0, lslots, h)
    everyone = torch.arange(buf.size, device=root.device)
    slots = torch.cat([root, buf.scratch])
    pos = torch.cat([root, root + buf.offset])
    mask = torch.cat([e.slots.unsqueeze(0) <= root, node_mask(pair, buf, everyone, root)])
    h = pair.deep_blocks(pair.hidden.index_select(0, slots), pos, slots=slots, mask=mask)
    if pair.final is None:
        return e.final(h).float().argmax(-1)
    state = e.norm(h)  # engine.final(h) = lm_head(norm(h)), split to keep the target's final states
    pair.final.index_copy_(0, slots, state)
    return e.lm_head(state).float().argmax(-1)


def tree_commit(pair, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy the accepted nodes' state (every layer's KV, the head's KV, h_k and, with a deep head, the
    target's final states and mid states) from scratch slots to the positions after the root."""
    e = pair.engine
    caches = (pair.head_k, pair.head_v)
    if e.kv is not None:  # every layer's keys and values in one tensor [2, layers, heads, slots, dim]
        e.kv.index_copy_(3, dst, e.kv.index_select(3, src))
    else:
        caches = (*e.k, *e.v, *caches)
    for cache in caches:
        cache.index_copy_(1, dst, cache.index_select(1, src))
    for rows in (pair.hidden, pair.final, pair.mid):
        if rows is not None:
            rows.index_copy_(0, dst, rows.index_select(0, src))
