"""Per-row sampling state of the runner, and the step's sampling over the rows it computed.

A row's sampling state: temperature, top-k/top-p/min-p and its seeded random stream
(server/sampling.py), its logit controls (penalties, logit_bias, min_tokens;
server/logit_controls.py), its grammar (structured outputs; server/structured.py) and which log
probabilities it reports (server/logprobs.py). Every piece only reads and writes its own row, so
a row's tokens and numbers never depend on the rows that share its step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from server.logit_controls import RowControls, apply_controls
from server.logprobs import TokenLogprob, next_token_targets, token_logprobs
from server.sampling import SamplingParams, sample
from server.grammar_masks import SLOW_FILL_S, GrammarRefusedError, GrammarState, allocate_masks, apply_masks

log = logging.getLogger("loraswap.engine")

NON_FINITE = -1  # the "token" of a row whose logits are not finite
GRAMMAR_REFUSED = -2  # the "token" of a row whose grammar allowed nothing it could sample
GRAMMAR_TOO_SLOW = -3  # the "token" of a row whose grammar's masks kept taking too long
UNSAMPLED = {  # why a row got one of those "tokens" (the engine ends that request with it)
    NON_FINITE: "the model's output became NaN or infinite for this request (its adapter's numbers overflow); "
                "it was stopped",
    GRAMMAR_REFUSED: "no token of this model's vocabulary can continue the requested output format here (or "
                     "min_tokens held back the stop token that ends it); the request was stopped",
    GRAMMAR_TOO_SLOW: f"the requested output format costs too much to follow (its allowed tokens took over "
                      f"{SLOW_FILL_S * 1000:.0f} ms per step, e.g. a regex with nested repetition); simplify it",
}
CLIENT_ERRORS = {GRAMMAR_REFUSED, GRAMMAR_TOO_SLOW}  # the request's own format, not the server, ended it


class RowSampler:
    def __init__(self, rows: int, width: Callable[[], int], device: torch.device) -> None:
        """`width()`: the columns of the logits a step produces."""
        self.rows = rows
        self.width = width
        self.device = device
        self.temperature = torch.zeros(rows, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(rows, dtype=torch.int64, device=device)
        self.top_p = torch.ones(rows, dtype=torch.float32, device=device)
        self.seeds = torch.zeros(rows, dtype=torch.int64, device=device)
        # Tokens each row has sampled (its random stream's step, and what min_tokens counts).
        self.generated: list[int] = [0] * rows
        self.params: list[SamplingParams] = [SamplingParams(temperature=0)] * rows
        # Logit controls: each row's tensors (stop ids for min_tokens, bias), and, allocated with
        # the first penalized row, which tokens each row has seen (prompt and output) and how
        # often it generated each.
        self.row_controls: list[RowControls | None] = [None] * rows
        self._seen: torch.Tensor | None = None  # [rows, V] bool
        self._counts: torch.Tensor | None = None  # [rows, V] float32
        self.histories: list[list[int] | None] = [None] * rows  # generated tokens, for multi-token bad words
        self.grammars: list[GrammarState | None] = [None] * rows
        self.prompts: list[Sequence[int]] = [()] * rows
        self.prompt_tops: list[int | None] = [None] * rows  # prompt logprobs still to compute
        self._prompt_logprobs: dict[int, list[TokenLogprob]] = {}
        self.step_logprobs: dict[int, TokenLogprob] = {}  # row -> its sampled token's, this step
        self._masks: Future[torch.Tensor] | None = None
        self._mask_rows: list[int] = []
        self._pool: ThreadPoolExecutor | None = None
        # Seconds spent computing grammar masks (on the worker) and waiting for them after the
        # forward (on the step's path): what structured outputs cost a step (bench/structured_outputs.py).
        self.mask_s = 0.0
        self.mask_wait_s = 0.0

    # ---- rows ----------------------------------------------------------------------------
    def reset(self, row: int, params: SamplingParams, seed: int, *, steps: int, stop_ids: tuple[int, ...],
              prompt: Sequence[int], history: Sequence[int]) -> None:
        """Start a sequence on `row` (see ModelRunner.reset_row). Prompt logprobs are computed
        on a first start only (a resumed sequence, history non-empty, reported them)."""
        grammar = None
        if params.grammar is not None:  # first: a history the grammar refuses fails the start
            grammar = GrammarState(params.grammar, stop_ids, history)
        self.temperature[row] = params.temperature
        self.top_k[row] = params.top_k
        self.top_p[row] = params.top_p
        self.seeds[row] = seed
        self.params[row] = params
        self.generated[row] = steps
        self.grammars[row] = grammar
        self.histories[row] = list(history) if params.controls.needs_history else None
        self.prompts[row] = prompt
        self.prompt_tops[row] = params.prompt_logprobs if not history else None
        self._prompt_logprobs.pop(row, None)
        self.row_controls[row] = None
        controls = params.controls
        if controls.active:
            self.row_controls[row] = RowControls.build(controls, stop_ids, self.width(), self.device)
        if controls.penalized:
            seen, counts = self._penalty_state()
            seen[row] = False
            counts[row] = 0
            if prompt:
                seen[row, torch.tensor(list(prompt), dtype=torch.int64, device=self.device)] = True
            if history:
                ids = torch.tensor(list(history), dtype=torch.int64, device=self.device)
                counts[row].index_add_(0, ids, torch.ones(len(history), device=self.device))
                seen[row, ids] = True

    def free(self, row: int) -> None:
        self.grammars[row] = None
        self.histories[row] = None
        self.prompts[row] = ()
        self.prompt_tops[row] = None
        self._prompt_logprobs.pop(row, None)

    def _penalty_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(seen, counts) # [rows, V], allocated on first use (V: the widest logits a row gets)."""
        if self._seen is None or self._counts is None:
            vocab = self.width()
            self._seen = torch.zeros(self.rows, vocab, dtype=torch.bool, device=self.device)
            self._counts = torch.zeros(self.rows, vocab, dtype=torch.float32, device=self.device)
        return self._seen, self._counts

    # ---- prompt logprobs -------------------------------------------------------------------
    def wants_prompt_logprobs(self, row: int) -> bool:
        return self.prompt_tops[row] is not None

    def add_prompt_logprobs(self, row: int, logits: torch.Tensor, start: int) -> None:
        """Score the prompt tokens that positions start.. of `row` predict. logits # [L, V]"""
        top = self.prompt_tops[row]
        assert top is not None
        targets = next_token_targets(list(self.prompts[row]), start, logits.shape[0])
        keep = [i for i, t in enumerate(targets) if t >= 0]
        if not keep:
            return
        index = torch.tensor(keep, dtype=torch.int64, device=logits.device)
        chosen = torch.tensor([targets[i] for i in keep], dtype=torch.int64, device=logits.device)
        scored = token_logprobs(logits[index], chosen, [top] * len(keep))
        # Entry p is position p's: a chunk scored again (its step re-run apart) replaces its entries.
        kept = self._prompt_logprobs.setdefault(row, [])
        del kept[start:]
        kept.extend(scored)

    def take_prompt_logprobs(self, row: int) -> list[TokenLogprob] | None:
        """The row's prompt logprobs (position 1 on) once its prefill is done; None if not asked."""
        if self.prompt_tops[row] is None:
            return None
        self.prompt_tops[row] = None
        return self._prompt_logprobs.pop(row, [])

    # ---- grammar masks ---------------------------------------------------------------------
    def begin_masks(self, rows: Sequence[int]) -> None:
        """Start computing the grammar masks of the rows this step samples, on a worker thread
        while the forward runs (the grammar engine works on the CPU, off the step's path)."""
        grammars = [(row, g) for row in rows if (g := self.grammars[row]) is not None]
        self._mask_rows = [row for row, _ in grammars]
        self._masks = None
        if not grammars:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="loraswap-grammar")
        self._masks = self._pool.submit(self._fill, [g for _, g in grammars])

    def _fill(self, grammars: list[GrammarState]) -> torch.Tensor:
        """The masks # [c, W] int32, each grammar writing its own row (worker thread)."""
        start = time.perf_counter()
        masks = allocate_masks(len(grammars), grammars[0].vocab)
        for i, grammar in enumerate(grammars):
            grammar.fill(masks, i)
        self.mask_s += time.perf_counter() - start
        return masks

    def _grammar_masked(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        constrained = [i for i, row in enumerate(rows) if self.grammars[row] is not None]
        if not constrained:
            return logits
        if self._masks is None or self._mask_rows != [rows[i] for i in constrained]:
            self.begin_masks(rows)  # a caller that did not start them (tests, tools)
        assert self._masks is not None
        start = time.perf_counter()
        masks = self._masks.result()  # [c, W] int32
        self.mask_wait_s += time.perf_counter() - start
        self._masks = None
        return apply_masks(logits, constrained, masks)

    # ---- sampling --------------------------------------------------------------------------
    def sample(self, logits: torch.Tensor, rows: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Each row's next token, as a tensor # [n] and read back once as a list: NON_FINITE for
        a row whose logits hold NaN or inf (found with the tokens: no extra device sync; a row's
        sum is non-finite exactly when one of its logits is, finite logits cannot add up past
        float32's range), GRAMMAR_REFUSED (in the list) for a row whose grammar refused its
        token. `rows`: the runner row of each logit row."""
        index = torch.tensor(rows, dtype=torch.int64, device=self.device)  # [n]
        params = [self.params[row] for row in rows]
        random_rows = [i for i, p in enumerate(params) if p.temperature > 0]
        processed = self._grammar_masked(self._controlled(logits, rows), rows)
        min_p = None
        if any(params[i].min_p > 0 for i in random_rows):
            min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=self.device)
        tokens = sample(
            processed,
            temperature=self.temperature[index],
            top_k=self.top_k[index],
            top_p=self.top_p[index],
            seeds=self.seeds[index],
            steps=torch.tensor([self.generated[row] for row in rows], dtype=torch.int64, device=self.device),
            random_rows=random_rows,
            filtering=any(params[i].top_k > 0 or params[i].top_p < 1 for i in random_rows),
            min_p=min_p,
        )  # [n]
        # The model's own logits decide finiteness (min_tokens and grammars put -inf in on purpose).
        tokens = torch.where(torch.isfinite(logits.sum(dim=-1)), tokens, NON_FINITE)  # [n]
        self._record_logprobs(logits, tokens, rows, params)
        chosen = tokens.tolist()  # the step's one read-back
        # The rows' state changes only from here, and nothing below raises: a step that failed
        # above and is run again row by row (the runner's isolation) counts each token once.
        self._count(tokens, rows, params)
        for row, token in zip(rows, chosen):
            self.generated[row] += 1
            history = self.histories[row]
            if history is not None:
                history.append(token)
        self._advance_grammars(chosen, rows)
        return tokens, chosen

    def _count(self, tokens: torch.Tensor, rows: list[int], params: list[SamplingParams]) -> None:
        """Count what penalized rows generated."""
        penalized = [i for i, p in enumerate(params) if p.controls.penalized]
        if penalized:
            seen, counts = self._penalty_state()
            at = torch.tensor([rows[i] for i in penalized], dtype=torch.int64, device=self.device)
            chosen = tokens[penalized].clamp(min=0)
            counts.index_put_((at, chosen), torch.ones(len(penalized), device=self.device), accumulate=True)
            seen[at, chosen] = True

    def _record_logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, rows: list[int],
                         params: list[SamplingParams]) -> None:
        self.step_logprobs = {}
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not wanted:
            return
        at = torch.tensor(wanted, dtype=torch.int64, device=self.device)
        scored = token_logprobs(logits[at], tokens[at].clamp(min=0), [params[i].logprobs or 0 for i in wanted])
        self.step_logprobs = {rows[i]: lp for i, lp in zip(wanted, scored)}

    def _advance_grammars(self, chosen: list[int], rows: list[int]) -> None:
        """Feed each constrained row's token to its grammar; GRAMMAR_REFUSED in `chosen` for a
        row whose grammar refused it (every token was masked out, e.g. min_tokens holding back
        the stop token the grammar needs)."""
        for i, row in enumerate(rows):
            grammar = self.grammars[row]
            if grammar is None or chosen[i] == NON_FINITE:
                continue
            if grammar.too_slow:
                chosen[i] = GRAMMAR_TOO_SLOW
                continue
            try:
                grammar.accept(chosen[i])
            except Exception as exc:  # refused, or the matcher failed: this row ends, the others go on
                if not isinstance(exc, GrammarRefusedError):
                    log.warning("grammar matcher failed on row %d: %s", row, exc)
                chosen[i] = GRAMMAR_REFUSED

    def _controlled(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """`logits` # [n, V] with each row's logit controls applied (the same tensor when no row has any)."""
        active = [(i, c) for i, row in enumerate(rows) if (c := self.row_controls[row]) is not None]
        if not active:
            return logits
        out = logits.clone()
        width = logits.shape[-1]
        for i, row_controls in active:
            row = rows[i]
            seen, counts = self._penalty_state() if row_controls.controls.penalized else (None, None)
            out[i] = apply_controls(logits[i], row_controls, generated=self.generated[row],
                                    seen=None if seen is None else seen[row, :width],
                                    counts=None if counts is None else counts[row, :width],
                                    history=self.histories[row])
        return out
