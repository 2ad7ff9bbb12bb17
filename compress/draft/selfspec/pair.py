"""Self-speculation on the block engine: the drafter and the verifier share the target's first blocks.

State per position p of the sequence: the shallow blocks' KV (the target's own layers 0..k−1)
and their output h_k(p) kept in a buffer; the exit head's KV; the deep blocks' KV (layers k..L−1).
Three lengths say how far each is written; rewinding is lowering them (positions are explicit,
the next write overwrites a rejected slot).

Drafting a token runs the shallow blocks once on it (writing the target's layer-0..k−1 KV and
h_k) and the exit head; verification then runs the shallow blocks only on the one token no
drafting step has seen (the last draft) and the deep blocks on all γ+1 rows, reading h_k from
the buffer: drafting never redoes work that verification needs, and verification never redoes
the shallow work of drafting (``shallow_rows`` counts the shallow rows each side ran).

Every committed token's shallow state is computed by a one-row pass (the drafting step of it, or
the verifier's pass over the last draft, or a one-token target step) — the same kernels a
one-token target step uses — and its deep state by a (γ+1)-row verify pass. ``run_target(pair.
target, pad_to=γ+1)`` decodes the target alone through exactly those shapes: the matched reference
against which greedy output is identical by construction (compress/draft/loop.py).

Greedy drafting with a fixed γ records the whole round — γ × (shallow step, exit head, argmax,
next input) — as ONE CUDA graph: no host sync and no kernel launch from Python per drafted token.
Sampling and confidence stopping draft one graph step at a time (stopping reads the confidence
on the host after each draft).

Deep-context heads (``ExitHead(context="deep")``) also read the final state of the position before:
``final`` [max_len, hidden] holds, per position, the target's final-normed state (written by every
verify pass) or, for a position drafted in the running round, the head's own final-normed state
(written by that draft step; verification overwrites it). Position 0 reads zeros. A drafted
position's head KV comes from the head's own state; once the position is committed it must come
from the target's (``ExitHead.forward_unrolled``), so after a round the head's committed length is
the round's first position + 1: the next round feeds the accepted drafts again, their shallow state
is reused (``shallow_upto`` skips it) and one multi-row head pass recomputes their head KV from the
target's final states before drafting. The drafter's prefill runs only the shallow blocks (no final
state exists before the target's prefill); the head catches up over the prompt at the first draft.
Draft trees (selfspec/tree.py) take deep heads the same way: the root is a draft step reading the
target's final state, each node reads its parent's head state (``final``'s scratch rows), verification
writes the target's final states and the commit copies the accepted path's rows to the sequence's."""
from __future__ import annotations

import torch

from compress.draft.engine import GRAPH_ROWS, BlockEngine, LayerTensors, StepGraphs, _rms, prefill_bucket
from compress.draft.loop import DraftRule, draft_by_steps
from compress.draft.selfspec.head import ExitHead, mid_norm
from compress.draft.selfspec.tree import TreeBuffers, as_tree, tree_draft, tree_verify
from compress.draft.speculative import pad_rows
from compress.errors import CompressError


def head_tensors(head: ExitHead, dtype: torch.dtype, device) -> tuple[LayerTensors, torch.Tensor, torch.Tensor]:
    cast = lambda t: None if t is None else t.detach().to(device=device, dtype=dtype)  # noqa: E731
    layer = LayerTensors(ln1=cast(head.ln1), ln2=cast(head.ln2), wqkv=cast(head.wqkv), bqkv=cast(head.bqkv),
                         wo=cast(head.wo), wgu=cast(head.wgu), wd=cast(head.wd), n_q=head.n_q, n_kv=head.n_kv)
    return layer, cast(head.norm), cast(head.lm_rows)


class SelfSpecPair:
    """The shared state; ``.drafter`` and ``.target`` are its two views for the loop."""

    def __init__(self, engine: BlockEngine, head: ExitHead, *, graphs: bool = False, tree=None,
                 prefill_buckets: bool | None = None, fuse_head: bool | str = False):
        self.deep = getattr(head, "wf", None) is not None
        if head.fingerprint["num_hidden_layers"] != engine.num_layers:
            raise CompressError(f"the head was trained for a {head.fingerprint['num_hidden_layers']}-block target, "
                                f"this one has {engine.num_layers}")
        self.engine, self.k = engine, head.exit_layer
        e = engine
        self.layer, self.norm, self.lm_rows = head_tensors(head, e.dtype, e.device)
        self.vocab_map = head.vocab_map.to(e.device)
        self.head_k = torch.zeros(head.n_kv, e.max_len, e.head_dim, device=e.device, dtype=e.dtype)
        self.head_v = torch.zeros_like(self.head_k)
        self.hidden = torch.zeros(e.max_len, e.config.hidden_size, device=e.device, dtype=e.dtype)
        # deep context: the map of the previous position's final state, and the final states themselves
        self.wf = head.wf.detach().to(device=e.device, dtype=e.dtype) if self.deep else None
        self.final = torch.zeros_like(self.hidden) if self.deep else None
        # a mid layer: its map and the target's normed states after block m (zero rows for drafts)
        self.mid_layer = getattr(head, "mid_layer", None)
        self.wm = None if self.mid_layer is None else head.wm.detach().to(device=e.device, dtype=e.dtype)
        self.mid = None if self.mid_layer is None else torch.zeros_like(self.hidden)
        self.ones = None if self.mid_layer is None else torch.ones(e.config.hidden_size, device=e.device, dtype=e.dtype)
        self.graphs = StepGraphs(e.device, graphs)
        # prefills padded to a bucket's rows and replayed (engine.prefill_bucket); their own graphs, so a
        # failed capture there leaves the decode graphs on
        self.prefill_graphs = StepGraphs(e.device, graphs)
        self.prefill_buckets = bool(graphs) if prefill_buckets is None else bool(prefill_buckets)
        self.shallow_len = self.head_len = self.deep_len = 0
        self.shallow_rows = {"drafter": 0, "verifier": 0}  # since the last reset (one sequence)
        self.shallow_total = {"drafter": 0, "verifier": 0}  # since construction
        # tree drafting (selfspec/tree.py): its nodes' scratch slots are the cache's last ones
        self.tree = as_tree(tree)
        self.tree_buf = None if self.tree is None else TreeBuffers(self.tree, e.max_len, e.device)
        self.context = e.max_len - (self.tree.size if self.tree else 0)
        self.drafter, self.target = _Drafter(self), _Verifier(self)
        # fuse_head: a greedy round's head step (the deep map, the head block, its norm, the trimmed LM rows,
        # argmax and the id map) compiled as one program, so its small kernels fuse across the calls'
        # boundaries (a torch.compile backend; True: inductor). Drafts only: the shallow blocks stay the
        # engine's own compiled layer, because verification reuses their states and keys, which must be
        # the target alone's to the bit.
        self.fuse_head = bool(fuse_head)
        self._head_token = self._head_token_eager
        if fuse_head:
            backend = fuse_head if isinstance(fuse_head, str) else "inductor"
            self._head_token = torch.compile(self._head_token_eager, fullgraph=True, dynamic=False, backend=backend)

    # ---------------------------------------------------------------- programs (graph-safe)

    def _shallow(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = self.engine.run_layers(self.engine.embed(ids), pos, 0, self.k)
        self.hidden.index_copy_(0, pos, h)
        return h

    def _head_layer(self, h, pos, slots, mask) -> torch.Tensor:
        e, t = self.engine, self.layer
        return e.layer_fn(h.shape[0])(h, e.cos[pos], e.sin[pos], mask, t.ln1, t.ln2, t.wqkv, t.bqkv, t.wo, t.wgu,
                                      t.wd, self.head_k, self.head_v, slots, t.n_q, t.n_kv, e.head_dim, e.eps,
                                      e.scale, e.act)

    @staticmethod
    def _prev(rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``rows`` of positions pos − 1 (zeros at position 0), graph-safe."""
        prev = rows.index_select(0, (pos - 1).clamp(min=0))
        return prev * (pos > 0).unsqueeze(-1).to(prev.dtype)

    def _fuse(self, h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The head's input for rows h at ``pos``: a deep head adds the mapped final state of each row's
        position before (``final``), a mid layer its mapped mid state (``mid``); a shallow head reads h alone."""
        if not self.deep:
            return h
        x = h + torch.nn.functional.linear(self._prev(self.final, pos), self.wf)
        if self.mid is not None:
            x = x + torch.nn.functional.linear(self._prev(self.mid, pos), self.wm)
        return x

    def _head(self, h: torch.Tensor, pos: torch.Tensor, write: bool = False) -> torch.Tensor:
        """Exit head on rows h at ``pos`` (writing its KV): trimmed logits of the last row, float32.
        A deep head: each row fuses the final state of the position before (``final``); ``write`` (a
        draft step, one row) keeps the row's own final-normed state in ``final[pos]`` for the next
        draft of the round — a catch-up over committed positions must not (it would clobber the
        target's states)."""
        x = self._head_layer(self._fuse(h, pos), pos, pos, self.engine.mask(pos))
        state = _rms(x[-1:], self.norm, self.engine.eps)
        if self.deep and write:
            self.final.index_copy_(0, pos[-1:], state)
            if self.mid is not None:  # a drafted position has no mid state: the next draft reads zeros
                self.mid.index_fill_(0, pos[-1:], 0)
        return torch.nn.functional.linear(state, self.lm_rows).float()[0]

    def _head_kv(self, h: torch.Tensor, pos: torch.Tensor) -> None:
        """A catch-up: the exit head's keys and values of committed rows h at ``pos`` (a deep head's fused
        with the final states before them), nothing else — no logits or state of theirs is read."""
        e, t = self.engine, self.layer
        e.kv_fn(h.shape[0])(self._fuse(h, pos), e.cos[pos], e.sin[pos], t.ln1, t.wqkv, t.bqkv, self.head_k,
                            self.head_v, pos, t.n_q, t.n_kv, e.head_dim, e.eps)

    def head_rows(self, h, pos, slots, mask, prev: torch.Tensor | None = None) -> torch.Tensor:
        """Exit head on rows h (KV written at ``slots``, reading ``mask``): trimmed logits of every row.
        ``prev`` [M] (a deep head, tree drafting): the rows of ``final`` each row reads as its previous
        position's final state; each row's own final-normed state is written to ``final[slots]``."""
        if prev is not None:
            h = h + torch.nn.functional.linear(self.final.index_select(0, prev), self.wf)
        x = self._head_layer(h, pos, slots, mask)
        state = _rms(x, self.norm, self.engine.eps)
        if prev is not None:
            self.final.index_copy_(0, slots, state)
        return torch.nn.functional.linear(state, self.lm_rows).float()

    def _deep_states(self, pos: torch.Tensor) -> torch.Tensor:
        """The deep blocks on the rows at ``pos`` (reading h_k from the buffer) and the final norm: the
        states the LM head reads, kept in ``final`` for a deep head."""
        state = self.engine.norm(self.deep_blocks(self.hidden[pos], pos))
        if self.final is not None:
            self.final.index_copy_(0, pos, state)
        return state

    def deep_blocks(self, h: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor | None = None,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
        """Blocks k..L−1 on rows h (``engine.run_layers``); with a mid layer m the pass stops after block m
        to keep the rows' normed states in ``mid`` (at ``slots``, default the positions): the same layers,
        in the same order, so the target's numbers do not change."""
        e = self.engine
        if self.mid is None:
            return e.run_layers(h, pos, self.k, e.num_layers, slots=slots, mask=mask)
        h = e.run_layers(h, pos, self.k, self.mid_layer, slots=slots, mask=mask)
        self.mid.index_copy_(0, pos if slots is None else slots, mid_norm(h, e.eps, self.ones))
        return e.run_layers(h, pos, self.mid_layer, e.num_layers, slots=slots, mask=mask)

    def _deep(self, pos: torch.Tensor, first: int, real: int) -> torch.Tensor:
        # the head over all rows: a row's logits never depend on `keep` (engine.final = lm_head(norm(h)))
        return self.engine.lm_head(self._deep_states(pos)).float()[first:real]

    def _round(self, tok: torch.Tensor, pos0: torch.Tensor, gamma: int) -> torch.Tensor:
        """γ greedy drafts [γ] from ``tok`` at position pos0 (the argmax of the logits: a fused round reads
        no confidence, so no softmax is computed)."""
        drafts = []
        for j in range(gamma):
            pos = pos0 + j
            tok = self._head_token(self._shallow(tok, pos), pos)
            drafts.append(tok)
        return torch.cat(drafts)

    def _head_token_eager(self, h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """A draft step's head on one row: its greedy token id [1], its final state kept (``_head``)."""
        idx = self._head(h, pos, write=True).argmax(-1, keepdim=True)
        return self.vocab_map.index_select(0, idx)  # a 1-d index: a 0-d one would read it on the host

    def _bucket(self, start: int, n: int) -> int | None:
        """A prefill's padded row count (engine.prefill_bucket), below the tree's scratch slots; None: unpadded."""
        return prefill_bucket(n, start, self.context) if self.prefill_buckets else None

    def _prefill(self, key, fn, *inputs):
        """A padded prefill program, replayed from its own graphs; the eager layers (no compile)."""
        with self.engine.eager():
            return self.prefill_graphs.run(key, fn, *inputs)

    def _positions(self, start: int, n: int) -> torch.Tensor:
        # a view of the engine's slot indices: no kernel launch on the host's per-round path
        if not 0 <= start <= start + n <= self.engine.max_len:
            raise CompressError(f"internal: positions {start}..{start + n - 1} outside the engine's "
                                f"{self.engine.max_len}")
        return self.engine.slots[start:start + n]

    def _run(self, key, fn, *inputs):
        """A program as a recorded graph for decode-sized passes; prefills (the first call of a
        sequence, or many rows) run eagerly and uncompiled, so no prompt length compiles anything
        (the callers pad a prefill to a bucket and replay it through ``_prefill`` where one fits)."""
        if key[1] <= GRAPH_ROWS and self.deep_len > 0:
            return self.graphs.run(key, fn, *inputs)
        with self.engine.eager():
            return fn(*inputs)

    def shallow_upto(self, ids: torch.Tensor, start: int, who: str) -> None:
        """Shallow blocks for the tokens ``ids`` at ``start ..`` that have none yet."""
        skip = max(self.shallow_len - start, 0)
        todo = ids[skip:]
        if todo.numel():
            n = todo.numel()
            bucket = None if n <= GRAPH_ROWS and self.deep_len > 0 else self._bucket(start + skip, n)
            if bucket is None:
                self._run(("shallow", n), self._shallow, todo, self._positions(start + skip, n))
            else:  # a prefill's rows
                self._prefill(("shallow", bucket), self._shallow, pad_rows(todo, bucket),
                              self._positions(start + skip, bucket))
            self.shallow_rows[who] += todo.numel()
            self.shallow_total[who] += todo.numel()
            self.shallow_len = start + ids.numel()

    def reset(self) -> None:
        self.shallow_len = self.head_len = self.deep_len = 0
        self.shallow_rows = {"drafter": 0, "verifier": 0}

    def rewind(self, length: int) -> None:
        self.shallow_len = min(self.shallow_len, length)
        self.head_len = min(self.head_len, length)
        self.deep_len = min(self.deep_len, length)

    def tree_committed(self, m: int) -> None:
        """After a tree round (verified, accepted and committed on the device by one program): root +
        the m accepted nodes are the sequence's; the deepest nodes never ran the exit head, so a path
        that reaches the tree's depth leaves the head one token behind. A deep head: the accepted nodes'
        head KV came from the head's own final states, so the head keeps only the root (as after a
        linear round) and the next round's catch-up recomputes them from the target's."""
        root = self.deep_len - 1
        self.shallow_len = self.deep_len = root + 1 + m
        if self.deep:
            self.head_len = root + 1
        else:
            self.head_len = root + 1 + m - (1 if m == self.tree.max_depth else 0)


class _Drafter:
    """The loop's drafter: feeds are the committed tokens it has not seen; drafts come from the head."""

    def __init__(self, pair: SelfSpecPair):
        self.pair = pair
        self.device = pair.engine.device
        self.context = pair.context
        self.vocab_map = pair.vocab_map
        self.rounds_fused = 0

    @property
    def length(self) -> int:
        return min(self.pair.shallow_len, self.pair.head_len)

    def _step(self, feed: torch.Tensor) -> torch.Tensor:
        """Shallow blocks where missing and the exit head for ``feed`` (after ``length`` tokens);
        trimmed logits of the last position. A deep head: positions the target has verified are a
        catch-up (reading and keeping the target's final states); one unverified position is a draft
        step (its own final state kept for the next draft)."""
        p = self.pair
        start = self.length
        p.shallow_upto(feed, start, "drafter")
        n = feed.numel()
        pos = p._positions(start, n)
        write = p.deep and start + n > p.deep_len
        if write and n != 1:
            raise CompressError("internal: a deep head drafts one unverified position at a time")
        fn = self._head_program(write)
        if p.deep and start == 0:  # a deep head's first position (a one-token prompt; longer ones catch
            with p.engine.eager():  # up in _catch_up): eager, as a prefill, so it records no graph
                logits = fn(pos).clone()
        else:
            logits = p._run(("head", n, write), fn, pos).clone()
        p.head_len = start + n
        return logits

    def _head_program(self, write: bool):
        p = self.pair
        return lambda pos: p._head(p.hidden[pos], pos, write)

    def _kv_program(self):
        p = self.pair
        return lambda pos: p._head_kv(p.hidden[pos], pos)

    def _catch_up(self, feed: torch.Tensor) -> None:
        """Shallow blocks where missing and the exit head's KV for committed tokens ``feed`` (after
        ``length``): what the next draft attends to, without the layer's output or any logits."""
        p = self.pair
        start = self.length
        p.shallow_upto(feed, start, "drafter")
        n = feed.numel()
        bucket = p._bucket(start, n) if start == 0 or n > GRAPH_ROWS else None
        if bucket is not None:  # over the prompt: a prefill, padded to its bucket and replayed
            p._prefill(("head-kv", bucket), self._kv_program(), p._positions(start, bucket))
        elif start == 0:  # over the prompt: a prefill, eager, so no prompt length records a graph
            with p.engine.eager():
                self._kv_program()(p._positions(start, n))
        else:
            p._run(("head-kv", n), self._kv_program(), p._positions(start, n))
        p.head_len = start + n

    def record_catch_ups(self, depth: int) -> None:
        """Record the catch-up programs for every count of accepted drafts a round can leave (1..``depth``):
        alone (a deep head's), and fused with a greedy linear round of every budget 1..``depth``. Which counts a
        warm-up run meets depends on its acceptance, and one met first in a timed run is a graph capture
        (and a compile for a new row count) charged to that run. It writes state at positions 1..2·depth
        only, which every later sequence rewrites before reading (positions run in order, each attending
        to earlier ones; a deep head's drafted final states are read only by the round that drafts them)."""
        p = self.pair
        if p.deep_len == 0:
            return
        token = torch.zeros(1, dtype=torch.long, device=self.device)
        for n in range(1, depth + 1):
            if p.deep:
                p._run(("head-kv", n), self._kv_program(), p._positions(1, n))
            for budget in range(1, depth + 1 if p.tree is None else 1):  # a tree pair is warmed for tree rounds
                self._fused_round(1, n, token, budget)

    def _fused_round(self, start: int, n: int, feed: torch.Tensor, budget: int) -> torch.Tensor:
        """One recorded program: the exit head's catch-up over the ``n`` committed positions from ``start``
        (their shallow state exists), then ``budget`` greedy drafts from the one token ``feed`` after them.
        A round then costs one graph launch, not two, on the host's path from the last verify's read to
        the next draft; ``n`` = 0 is the round alone."""
        p = self.pair
        pos0 = p._positions(start + n, 1)
        if n == 0:
            return p.graphs.run(("round", budget, 0), lambda t, q: p._round(t, q, budget), feed, pos0)

        def program(catch, t, q):
            p._head_kv(p.hidden[catch], catch)
            return p._round(t, q, budget)
        return p.graphs.run(("round", budget, n), program, p._positions(start, n), feed, pos0)

    def prefill(self, ids: torch.Tensor) -> None:
        if self.pair.deep:  # no final state exists yet: the head catches up at the first draft
            self.pair.shallow_upto(ids, 0, "drafter")
        else:  # the head's keys and values of the prompt: the head layer's own first part, no logits
            self._catch_up(ids)

    def draft(self, feed: torch.Tensor, budget: int, rule: DraftRule):
        p = self.pair
        if budget < 1:
            return torch.zeros(0, dtype=torch.long, device=self.device), ([] if rule.sample else None)
        fused = not rule.sample and rule.threshold is None and p.deep_len > 0
        catch = 0
        if feed.numel() > 1:
            # after a fully accepted round the last draft has shallow state (the verifier ran it) but
            # no exit-head state (a deep head: no committed head state for any accepted draft, nor for
            # the prompt at the first round): catch up on all but the newest token, then draft from it
            # (a greedy round after the prompt's: in the round's own recorded program)
            if fused and self.length > 0 and feed.numel() - 1 <= GRAPH_ROWS:
                catch = feed.numel() - 1
                p.shallow_upto(feed[:-1], self.length, "drafter")  # nothing, unless a caller skipped a step
            else:
                self._catch_up(feed[:-1])
            feed = feed[-1:]
        start = self.length
        if not fused:
            out = draft_by_steps(self._step, feed, budget, rule, self.device, self.vocab_map)
            if p.deep:  # the drafts' head KV came from the head's own states: redone once committed
                p.head_len = start + 1
            return out
        tokens = self._fused_round(start, catch, feed, budget)
        start += catch
        p.shallow_len = start + budget
        p.head_len = start + 1 if p.deep else start + budget
        p.shallow_rows["drafter"] += budget
        p.shallow_total["drafter"] += budget
        self.rounds_fused += 1
        return tokens.clone(), None

    def draft_tree(self, feed: torch.Tensor) -> torch.Tensor:
        """Every node's token [N] of the pair's static tree, rooted after ``feed``'s last token."""
        p, buf = self.pair, self.pair.tree_buf
        if buf is None:
            raise CompressError("this self-drafter was built without a draft tree")
        if p.deep and feed.numel() > 1:  # catch up on the verified tokens, then the root as a draft step
            self._catch_up(feed[:-1])
            feed = feed[-1:]
        root_logits = self._step(feed)
        root = p._positions(self.length - 1, 1)
        tokens = p._run(("tree_draft", buf.size), lambda l_, r_: tree_draft(p, buf, l_, r_), root_logits, root)
        rows = sum(r.numel() for r in buf.rows[1:-1])
        p.shallow_rows["drafter"] += rows
        p.shallow_total["drafter"] += rows
        return tokens.clone()

    def rewind(self, length: int) -> None:
        self.pair.rewind(length)

    def reset(self) -> None:
        self.pair.reset()


class _Verifier:
    """The loop's target: deep blocks over the pending rows, shallow blocks only where missing."""

    def __init__(self, pair: SelfSpecPair):
        self.pair = pair
        self.device = pair.engine.device
        self.context = pair.context

    @property
    def length(self) -> int:
        return self.pair.deep_len

    @property
    def tree(self):
        return self.pair.tree

    def verify_tree(self, pending: torch.Tensor, node_tokens: torch.Tensor) -> torch.Tensor:
        """Verify the tree rooted at ``pending`` (one token the drafter has run), accept its greedy path
        and commit its state, on the device: [m, path tokens (first m valid), next token] for
        ``accept_tree``, which the caller calls with those numbers read on the host."""
        p, buf = self.pair, self.pair.tree_buf
        if pending.numel() != 1 or p.shallow_len != p.deep_len + 1:
            raise CompressError("internal: a tree round verifies exactly one pending token the drafter has run")
        root = p._positions(p.deep_len, 1)
        out = p._run(("tree_verify", buf.size + 1), lambda t_, r_: tree_verify(p, buf, t_, r_), node_tokens, root)
        p.shallow_rows["verifier"] += buf.rows[-1].numel()
        p.shallow_total["verifier"] += buf.rows[-1].numel()
        p.deep_len += 1
        return out.clone()

    def accept_tree(self, verified: list[int]) -> list[int]:
        """``verify_tree``'s numbers read on the host: the new tokens (path + the target's next one)."""
        m = verified[0]
        self.pair.tree_committed(m)
        return verified[1:1 + m] + verified[-1:]

    def __call__(self, ids: torch.Tensor, keep: int = 1, pad_to: int | None = None) -> torch.Tensor:
        p = self.pair
        ids = ids.to(self.device).reshape(-1)
        real = ids.numel()
        if not 1 <= keep <= real:
            raise CompressError(f"target: feed at least one token and keep 1..{real} positions (keep={keep})")
        n = max(real, pad_to or 0)
        if p.deep_len + n > p.context:
            raise CompressError(f"target: {p.deep_len} cached + {n} new tokens exceed the engine's "
                                f"{p.context} positions (a draft tree's scratch slots excluded)")
        start = p.deep_len
        if p.shallow_len < start:
            raise CompressError("internal: shallow state behind the deep state")  # the loop never does this
        p.shallow_upto(ids, start, "verifier")
        # padding rows read whatever h the buffer holds there: their rows never touch the real ones
        first = real - keep
        # a prefill is bucketed; a padded call (pad_to: a verify pass and its matched reference) keeps its rows
        bucket = None if n <= GRAPH_ROWS and (p.deep_len > 0 or pad_to) else p._bucket(start, n)
        if bucket is None:
            logits = p._run(("deep", n, first, real), lambda pos_: p._deep(pos_, first, real),
                            p._positions(start, n)).clone()
        else:  # a prefill, padded to its bucket: the LM head on the kept rows only, after the replay
            states = p._prefill(("deep", bucket), p._deep_states, p._positions(start, bucket))
            logits = p.engine.lm_head(states[first:real]).float()
        p.deep_len = start + n
        return logits

    def rewind(self, length: int) -> None:
        self.pair.rewind(length)

    def reset(self) -> None:
        self.pair.reset()
